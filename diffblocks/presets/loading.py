"""Load a ready pipeline from a repository in diffusers layout (a local folder or a Hub id)."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from diffblocks.blocks import AbstractBlock, Pipeline
from diffblocks.blocks.introspect import component_names
from diffblocks.blocks.pipeline import PresetInfo
from diffblocks.blocks.quantizing import Quantization
from diffblocks.components import ComponentsManager, ComponentSpec, read_index
from diffblocks.components.hub import resolve_folder
from diffblocks.components.specs import CLASSIC_INDEX, MODULAR_INDEX, PipelineIndex, dtype_name
from diffblocks.presets.embeddings import EMBEDDINGS_KEY, apply_embeddings
from diffblocks.presets.families import FAMILIES, Family, family_of, register_family
from diffblocks.presets.ip_adapters import IP_ADAPTER_KEY, apply_ip_adapter
from diffblocks.presets.loras import LORAS_KEY, apply_loras
from diffblocks.presets.remote_code import RemoteCodeError, code_class, load_code
from diffblocks.presets.treefile import CODE_KEY, TREE_KEY, code_files, tree_from_json
from diffblocks.registry import BLOCKS

# components that hold no weights keep their own precision
_NOT_CAST = frozenset({"tokenizer", "tokenizer_2", "scheduler", "guider", "feature_extractor"})


PACKAGE_SCHEME = "package://"
DIFFUSERS_BLOCKS_CONFIG = "modular_config.json"  # where diffusers' custom blocks name their code (auto_map)
_MSG_DIFFUSERS_CODE = (
    "{repository} carries diffusers' own custom block code ({files}, named by the auto_map of its {config}). "
    "diffblocks does not run diffusers' block code: those blocks are written for diffusers' ModularPipeline, not "
    "as diffblocks blocks, and their code is not pinned and hashed as diffblocks requires. Load this repository "
    "with diffusers (ModularPipelineBlocks.from_pretrained(..., trust_remote_code=True)), or write the block as a "
    "diffblocks block and publish it with its preset (docs/publishing.md)."
)


def resolve_package_reference(reference: str, *, install_hints: Mapping[str, str] | None = None) -> Path:
    """The folder that ``package://<module>/<path>`` names inside an installed Python package.

    Index entries use this to share files that ship in a pip package (the tiny model's text
    encoder) rather than copying them: ``pretrained_model_name_or_path`` is the reference, and the
    folder is found on this machine when the pipeline is loaded. The package is located, not
    imported, and the path may not leave it. ``install_hints`` (the family's) says how to install a
    missing package.
    """
    module, _, relative = reference.removeprefix(PACKAGE_SCHEME).partition("/")
    parts = Path(relative).parts
    if not module.isidentifier() or ".." in parts or Path(relative).is_absolute():
        raise ValueError(f"{reference!r} is not of the form package://<top-level module>/<path inside it>")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        hint = (install_hints or {}).get(module, f"install the distribution that provides {module!r}")
        raise ModuleNotFoundError(f"{reference} needs the Python package {module!r}, which is not installed: {hint}")
    folder = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not folder.is_dir():
        raise FileNotFoundError(f"{reference}: package {module!r} has no folder {relative!r} (looked in {folder})")
    return folder


def from_pretrained(
    path_or_repo: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    manager: ComponentsManager | None = None,
    components: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
    quantization: Quantization = None,
) -> Pipeline:
    """A ready pipeline for a diffusers-layout repository, its family picked from the index file.

    A pipeline saved with an edited block tree loads that tree. When the tree has user-written
    blocks, their code runs only with ``trust_remote_code=True``, from the Hub only at a ``revision``
    that is a full commit hash, and only once every file matches the sha256 its index records (see
    :mod:`diffblocks.presets.remote_code`).

    A preset saved with LoRAs attaches them again (each file's sha256 checked first, see
    :mod:`diffblocks.presets.loras`), which loads the denoiser now; textual inversion embeddings
    and an IP-Adapter saved with it are added again alike (:mod:`diffblocks.presets.embeddings`,
    :mod:`diffblocks.presets.ip_adapters`), which loads the text encoders, or the UNet, now.

    Args:
        path_or_repo: a local folder or a Hub id (resolved through the cache; ``HF_HUB_OFFLINE`` respected).
        dtype: weights' dtype for the models (tokenizers and schedulers are unaffected).
        device: where models are loaded.
        revision: a Hub branch, tag or commit.
        variant: a weights variant such as ``"fp16"``.
        manager: share components with other pipelines through this manager.
        components: objects or specs that replace the repository's components (``{"scheduler": ...}``).
        quantization: a quantizer per component (``{"unet": TorchAoQuantizer("int8wo")}``), or one
            for the denoiser and text encoders (see :meth:`Pipeline.quantize`). Checked when the
            pipeline is built; the weights are quantized as they load.
        trust_remote_code: run the block code the repository carries (read it first).

    Raises:
        RemoteCodeError: the repository carries block code that may not run (not trusted, not
            pinned, ``DIFFBLOCKS_NO_REMOTE_CODE`` set, or a file that does not match its hash).
        ValueError: a saved LoRA's file does not match its recorded sha256 (the file is named).
    """
    weights_dtype = dtype_name(dtype) if dtype is not None else None  # refused before anything is read
    _refuse_diffusers_code(path_or_repo, revision=revision)
    index = read_index(path_or_repo, revision=revision)
    family = family_of(index.class_name, index.settings)
    blocks = _blocks(index, family, path_or_repo, revision=revision, trust_remote_code=trust_remote_code)
    manager = manager if manager is not None else ComponentsManager(device=device)
    if device is not None:
        manager.device = device
    specs: dict[str, Any] = {}
    sources: dict[str, str] = {}  # so that saving writes the portable reference, not this machine's folder
    for name, spec in index.components.items():
        changes: dict[str, Any] = {}
        if weights_dtype is not None and name not in _NOT_CAST:
            changes["dtype"] = weights_dtype
        if variant is not None and name not in _NOT_CAST and not _is_package(spec):
            changes["variant"] = variant
        if _is_package(spec):
            assert spec.repo is not None
            changes["repo"] = str(resolve_package_reference(spec.repo, install_hints=family.install_hints))
            sources[changes["repo"]] = spec.repo
        specs[name] = spec.with_(**changes) if changes else spec
    specs.setdefault("guider", family.guider())
    specs.update(components or {})
    needed = component_names(blocks)
    chosen = {name: value for name, value in specs.items() if name in needed}
    preset = PresetInfo(family.name, index.class_name, dict(index.settings), sources)
    name = f"{family.name}:{os.fspath(path_or_repo)}"
    pipe = Pipeline(blocks, chosen, manager=manager, name=name, preset=preset)
    pipe = pipe.quantize(quantization) if quantization is not None else pipe
    if LORAS_KEY in index.extras:  # the adapters saved with the preset, on the (quantized) denoiser
        apply_loras(pipe, index.extras[LORAS_KEY], path_or_repo, revision=revision)
    if EMBEDDINGS_KEY in index.extras:  # the textual inversions saved with it (docs/lora.md)
        apply_embeddings(pipe, index.extras[EMBEDDINGS_KEY], path_or_repo, revision=revision)
    if IP_ADAPTER_KEY in index.extras:  # the IP-Adapter saved beside it (docs/ip_adapter.md)
        apply_ip_adapter(pipe, index.extras[IP_ADAPTER_KEY], path_or_repo, revision=revision)
    return pipe


def _blocks(
    index: PipelineIndex,
    family: Family,
    path_or_repo: str | os.PathLike[str],
    *,
    revision: str | None,
    trust_remote_code: bool,
) -> AbstractBlock:
    """The saved block tree when the index has one (its code checked and imported first), else the family's."""
    tree = index.extras.get(TREE_KEY)
    if tree is None:
        return family.build(index.settings)
    files = code_files(tree)
    modules: dict[str, ModuleType] = {}
    if files:
        hashes = index.extras.get(CODE_KEY)
        hashes = hashes if isinstance(hashes, dict) else {}
        modules = load_code(path_or_repo, hashes, files, trust_remote_code=trust_remote_code, revision=revision)
    source = f"{os.fspath(path_or_repo)}: {index.source}"
    return tree_from_json(
        tree, registry=BLOCKS, code_class=lambda file, name: code_class(modules, file, name), source=source
    )


def _refuse_diffusers_code(path_or_repo: str | os.PathLike[str], *, revision: str | None) -> None:
    """Refuse a repository whose index or blocks config names diffusers' custom block code (``auto_map``).

    Raises:
        RemoteCodeError: naming the code files and what to do instead.
    """
    names = [DIFFUSERS_BLOCKS_CONFIG, MODULAR_INDEX]
    try:
        root = resolve_folder(path_or_repo, revision=revision, allow_patterns=[*names, CLASSIC_INDEX])
    except FileNotFoundError:
        return  # read_index says what is missing, in its own words
    for name in names:
        try:
            data = json.loads((root / name).read_text())
        except (OSError, ValueError):
            continue  # absent, or malformed: read_index reports a malformed index
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map:
            refs = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
            files = ", ".join(sorted({f"{str(ref).rpartition('.')[0] or ref}.py" for ref in refs}))
            raise RemoteCodeError(_MSG_DIFFUSERS_CODE.format(repository=os.fspath(path_or_repo), files=files, config=name))


def _is_package(spec: ComponentSpec) -> bool:
    return spec.repo is not None and spec.repo.startswith(PACKAGE_SCHEME)


__all__ = [
    "FAMILIES",
    "PACKAGE_SCHEME",
    "ComponentSpec",
    "Family",
    "family_of",
    "from_pretrained",
    "register_family",
    "resolve_package_reference",
]
