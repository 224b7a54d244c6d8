"""Component specs and the index files that list them (diffusers' ``modular_model_index.json`` and ``model_index.json``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from diffblocks._version import __version__
from diffblocks.components.config_files import ConfigFileError, read_json_object
from diffblocks.components.containment import check_folder, check_reference, check_subfolder, contained_path
from diffblocks.components.hub import resolve_folder

MODULAR_INDEX = "modular_model_index.json"
CLASSIC_INDEX = "model_index.json"
# dtypes by component, beside the entries: diffusers' ModularPipeline passes every key of an entry's
# loading spec to its ComponentSpec, which takes no dtype
DTYPES_KEY = "_diffblocks_dtypes"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def dtype_name(dtype: torch.dtype | str) -> str:
    """The index name of a weights dtype (``torch.float16`` or ``"float16"`` -> ``"float16"``).

    Raises:
        ValueError: not a floating-point dtype that models can be cast to; the message lists those that are.
    """
    for name, value in _DTYPES.items():
        if dtype == value or (isinstance(dtype, str) and dtype.removeprefix("torch.") == name):
            return name
    hint = " (integer weights come from a quantizer, diffblocks.components.quantizers)" if isinstance(dtype, torch.dtype) else ""
    raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}, the dtypes weights are cast to{hint}")


class ComponentSpec(BaseModel):
    """Where a component comes from and what it is, without loading it.

    Example:
        >>> from diffblocks.components import ComponentSpec
        >>> spec = ComponentSpec(name="unet", type_hint=("diffusers", "UNet2DConditionModel"),
        ...                      repo="org/model", subfolder="unet", variant="fp16")
        >>> spec.load_id
        'org/model|unet|fp16|main|default|diffusers.UNet2DConditionModel'
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    name: str
    type_hint: tuple[str, str] | None = None
    repo: str | None = None
    subfolder: str | None = None
    variant: str | None = None
    revision: str | None = None
    dtype: str | None = None
    config: dict[str, Any] | None = None
    random_weights: bool = False
    """Build a model from ``config`` alone with random weights (tests, training from scratch); without
    it a model spec that has a config but no repository is refused rather than silently untrained."""
    quantization: dict[str, Any] | None = None
    """The quantizer applied once the weights are read (``AbstractQuantizer.to_config()`` output)."""

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        return dtype_name(value) if value is not None else None

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _DTYPES[self.dtype] if self.dtype else None

    @property
    def load_id(self) -> str:
        """Identifies one loaded object: specs with the same load id share it."""
        kind = ".".join(self.type_hint) if self.type_hint else "?"
        if self.repo is None:
            return f"{self.name}|config|{json.dumps(self.config, sort_keys=True, default=str)}|{kind}"
        parts = (self.repo, self.subfolder or "", self.variant or "", self.revision or "main", self.dtype or "default")
        # the class is part of the identity: a tokenizer and a text encoder may read the same folder
        quantized = (f"quantized:{json.dumps(self.quantization, sort_keys=True)}",) if self.quantization else ()
        return "|".join((*parts, kind, *quantized))

    def with_(self, **changes: Any) -> ComponentSpec:
        """A copy with some fields changed (dtype, revision, ...)."""
        return self.model_copy(update=changes)

    def to_index_entry(self) -> list[Any]:
        """``[library, class_name, loading spec]`` as diffusers writes in ``modular_model_index.json``.

        The dtype is not part of it (diffusers' ModularPipeline refuses unknown keys there):
        :func:`write_modular_index` records dtypes under ``_diffblocks_dtypes``.
        """
        library, class_name = self.type_hint or (None, None)
        spec: dict[str, Any] = {
            "pretrained_model_name_or_path": self.repo,
            "revision": self.revision,
            "subfolder": self.subfolder,
            "type_hint": [library, class_name],
            "variant": self.variant,
        }
        if self.config is not None:
            spec["config"] = self.config
        if self.quantization is not None:
            spec["quantization"] = self.quantization
        return [library, class_name, spec]

    @classmethod
    def from_index_entry(cls, name: str, entry: Any, *, root: str | None = None) -> ComponentSpec | None:
        """Read one index entry; None for entries that name no class (``[null, null]``).

        ``root`` is the repository the index was read from: classic entries live in its subfolder
        ``name``, and modular entries whose files are in that repository load from it.
        """
        if not isinstance(entry, (list, tuple)) or len(entry) not in (2, 3):
            return None
        library, class_name = entry[0], entry[1]
        if library is None or class_name is None:
            return None
        if len(entry) == 2:
            return cls(name=name, type_hint=(library, class_name), repo=root, subfolder=name)
        spec = dict(entry[2] or {})
        repo = spec.get("pretrained_model_name_or_path", spec.get("repo"))
        hint = spec.get("type_hint") or (library, class_name)
        return cls(
            name=name,
            type_hint=(hint[0] or library, hint[1] or class_name),
            repo=repo if repo is not None or spec.get("config") is not None else root,
            subfolder=spec.get("subfolder"),
            variant=spec.get("variant"),
            revision=spec.get("revision"),
            dtype=spec.get("dtype"),
            config=spec.get("config"),
            quantization=spec.get("quantization"),
        )


class PipelineIndex(BaseModel):
    """The contents of an index file: component specs, the pipeline-level settings beside them, and the
    library's own keys (``extras``: those starting with ``_`` other than ``_class_name``)."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    class_name: str | None = None
    components: dict[str, ComponentSpec]
    settings: dict[str, Any]
    source: str
    extras: dict[str, Any] = {}


def read_index(path_or_repo: str | os.PathLike[str], *, revision: str | None = None) -> PipelineIndex:
    """Read ``modular_model_index.json`` (preferred) or ``model_index.json`` from a folder or a Hub id.

    Raises:
        RepositoryPathError: an entry names a path outside the repository or another repository
            by a local path, or a component folder already on disk links out of the repository
            (checked here, so that nothing is loaded from a repository that is refused).
    """
    root = resolve_folder(path_or_repo, revision=revision, allow_patterns=[MODULAR_INDEX, CLASSIC_INDEX])
    for filename in (MODULAR_INDEX, CLASSIC_INDEX):
        file = root / filename
        if file.is_file():
            data = read_json_object(file, what="a pipeline index (component names to [library, class] entries)")
            index = parse_index(data, root=str(path_or_repo), revision=revision, source=filename)
            _check_own_folders(index, root, repository=str(path_or_repo))
            return index
    raise FileNotFoundError(f"{str(path_or_repo)!r} has neither {MODULAR_INDEX} nor {CLASSIC_INDEX} (looked in {root})")


def parse_index(data: Mapping[str, Any], *, root: str, revision: str | None = None, source: str) -> PipelineIndex:
    """Split an index's JSON into component specs and settings.

    Raises:
        RepositoryPathError: an entry's subfolder is absolute or has ``..`` (or a backslash, or a
            drive letter), or its ``pretrained_model_name_or_path`` is neither a Hub id, a
            ``package://`` reference, nor the folder ``root`` itself (which diffusers'
            ``ModularPipeline.save_pretrained`` writes; see
            :func:`~diffblocks.components.containment.check_reference`).
    """
    components: dict[str, ComponentSpec] = {}
    settings: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    dtypes = data.get(DTYPES_KEY)
    dtypes = dtypes if isinstance(dtypes, dict) else {}
    for name, value in data.items():
        if name.startswith("_"):
            if name != "_class_name":
                extras[name] = value
            continue
        if isinstance(value, (list, tuple)) and len(value) in (2, 3):
            try:
                spec = ComponentSpec.from_index_entry(name, value, root=root)
            except (ValueError, TypeError) as err:
                raise ConfigFileError(_MSG_ENTRY.format(source=source, root=root, name=name, err=_first_line(err))) from None
            if spec is not None and spec.dtype is None and dtypes.get(name) is not None:
                spec = spec.with_(dtype=ComponentSpec(name=name, dtype=dtypes[name]).dtype)  # validated
            if spec is not None and spec.repo not in (None, root) and _names_itself(spec.repo, root):
                spec = spec.with_(repo=root)  # diffusers' ModularPipeline writes the folder it saved into
            if spec is not None:
                _check_entry(spec, root=root, source=source)
                if spec.repo == root and spec.revision is None and revision is not None:
                    spec = spec.with_(revision=revision)
                components[name] = spec
            continue
        settings[name] = value
    class_name = data.get("_class_name")
    return PipelineIndex(class_name=class_name, components=components, settings=settings, source=source, extras=extras)


def _names_itself(value: str, root: str) -> bool:
    """Whether an entry's local path is the very folder the index was read from (so, the repository itself)."""
    try:
        folder = Path(root).expanduser()
        return folder.is_dir() and Path(value).expanduser().resolve() == folder.resolve()
    except (OSError, ValueError):  # a NUL character, a path too long: not this folder
        return False


_MSG_ENTRY = (
    "{source} of {root!r}: entry {name!r} is malformed ({err}); an entry is [library, class_name] or "
    '[library, class_name, {{"pretrained_model_name_or_path": ..., "subfolder": ..., ...}}] with strings'
)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return " ".join(text.splitlines()[:3]) if text else type(err).__name__


def _check_entry(spec: ComponentSpec, *, root: str, source: str) -> None:
    entry = f"{source} entry {spec.name!r}"
    if spec.repo is not None and spec.repo != root:
        check_reference(spec.repo, repository=root, entry=entry, name=spec.name)
    if spec.subfolder:
        check_subfolder(spec.subfolder, repository=root, entry=f"{entry}, subfolder")


def _check_own_folders(index: PipelineIndex, folder: Path, *, repository: str) -> None:
    """Check the component folders of the repository itself that are on disk already (for a Hub id,
    those in the cache); the others are checked by :func:`resolve_folder` when they are fetched."""
    for spec in index.components.values():
        if spec.repo == repository and spec.subfolder:
            entry = f"{index.source} entry {spec.name!r}, subfolder"
            path = contained_path(folder, spec.subfolder, repository=repository, entry=entry)
            if path.is_dir():
                check_folder(path, folder, repository=repository)


def write_modular_index(
    folder: str | os.PathLike[str],
    specs: Mapping[str, ComponentSpec],
    *,
    class_name: str,
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``modular_model_index.json`` listing ``specs`` (and plain ``settings``), in diffusers' format.

    Each entry is ``[library, class name, loading spec]`` as diffusers' ``ModularPipeline`` reads it;
    the components' dtypes are recorded beside them, under ``_diffblocks_dtypes``.
    """
    data: dict[str, Any] = {"_class_name": class_name, "_diffblocks_version": __version__}
    data.update(settings or {})
    dtypes = {name: specs[name].dtype for name in sorted(specs) if specs[name].dtype}
    if dtypes:
        data[DTYPES_KEY] = dtypes
    for name in sorted(specs):
        data[name] = specs[name].to_index_entry()
    path = Path(folder) / MODULAR_INDEX
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path
