"""Load a ready pipeline from a repository in diffusers layout (a local folder or a Hub id)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from diffblocks.blocks import Pipeline
from diffblocks.blocks.introspect import component_names
from diffblocks.blocks.pipeline import PresetInfo
from diffblocks.blocks.quantizing import Quantization
from diffblocks.components import ComponentsManager, ComponentSpec, read_index
from diffblocks.presets.families import FAMILIES, Family, family_of, register_family

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# components that hold no weights keep their own precision
_NOT_CAST = frozenset({"tokenizer", "tokenizer_2", "scheduler", "guider", "feature_extractor"})


PACKAGE_SCHEME = "package://"


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
    quantization: Quantization = None,
) -> Pipeline:
    """A ready pipeline for a diffusers-layout repository, its family picked from the index file.

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
    """
    index = read_index(path_or_repo, revision=revision)
    family = family_of(index.class_name, index.settings)
    manager = manager if manager is not None else ComponentsManager(device=device)
    if device is not None:
        manager.device = torch.device(device)
    specs: dict[str, Any] = {}
    sources: dict[str, str] = {}  # so that saving writes the portable reference, not this machine's folder
    for name, spec in index.components.items():
        changes: dict[str, Any] = {}
        if dtype is not None and name not in _NOT_CAST:
            changes["dtype"] = _DTYPE_NAMES[dtype]
        if variant is not None and name not in _NOT_CAST and not _is_package(spec):
            changes["variant"] = variant
        if _is_package(spec):
            assert spec.repo is not None
            changes["repo"] = str(resolve_package_reference(spec.repo, install_hints=family.install_hints))
            sources[changes["repo"]] = spec.repo
        specs[name] = spec.with_(**changes) if changes else spec
    specs.setdefault("guider", family.guider())
    specs.update(components or {})
    blocks = family.build(index.settings)
    needed = component_names(blocks)
    chosen = {name: value for name, value in specs.items() if name in needed}
    preset = PresetInfo(family.name, index.class_name, dict(index.settings), sources)
    name = f"{family.name}:{os.fspath(path_or_repo)}"
    pipe = Pipeline(blocks, chosen, manager=manager, name=name, preset=preset)
    return pipe.quantize(quantization) if quantization is not None else pipe


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
