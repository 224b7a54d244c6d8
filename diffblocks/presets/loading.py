"""Load a ready pipeline from a repository in diffusers layout (a local folder or a Hub id)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from diffblocks.blocks import Pipeline, Sequence
from diffblocks.blocks.introspect import component_names
from diffblocks.components import ComponentsManager, ComponentSpec, read_index
from diffblocks.components.guiders import AbstractGuider
from diffblocks.presets import sd15

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# components that hold no weights keep their own precision
_NOT_CAST = frozenset({"tokenizer", "tokenizer_2", "scheduler", "guider", "feature_extractor"})


class Family:
    """A model family: its blocks, its default guider, and the index class names it reads."""

    def __init__(
        self, name: str, blocks: Callable[[], Sequence], guider: Callable[[], AbstractGuider], classes: tuple[str, ...]
    ) -> None:
        self.name, self.blocks, self.guider, self.classes = name, blocks, guider, classes


FAMILIES: dict[str, Family] = {
    "sd15": Family("sd15", sd15.sd15_blocks, sd15.default_guider, sd15.PIPELINE_CLASSES),
}


def family_of(class_name: str | None, settings: Mapping[str, Any]) -> Family:
    """The family for an index's ``_class_name`` (or its ``family`` setting)."""
    if isinstance(settings.get("family"), str) and settings["family"] in FAMILIES:
        return FAMILIES[settings["family"]]
    for family in FAMILIES.values():
        if class_name in family.classes:
            return family
    known = sorted(name for family in FAMILIES.values() for name in family.classes)
    raise ValueError(f"no preset reads pipelines of class {class_name!r}; supported: {', '.join(known)}")


def from_pretrained(
    path_or_repo: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    manager: ComponentsManager | None = None,
    components: Mapping[str, Any] | None = None,
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
    """
    index = read_index(path_or_repo, revision=revision)
    family = family_of(index.class_name, index.settings)
    manager = manager if manager is not None else ComponentsManager(device=device)
    if device is not None:
        manager.device = torch.device(device)
    specs: dict[str, Any] = {}
    for name, spec in index.components.items():
        changes: dict[str, Any] = {}
        if dtype is not None and name not in _NOT_CAST:
            changes["dtype"] = _DTYPE_NAMES[dtype]
        if variant is not None and name not in _NOT_CAST:
            changes["variant"] = variant
        specs[name] = spec.with_(**changes) if changes else spec
    specs.setdefault("guider", family.guider())
    specs.update(components or {})
    needed = component_names(family.blocks())
    chosen = {name: value for name, value in specs.items() if name in needed}
    return Pipeline(family.blocks(), chosen, manager=manager, name=f"{family.name}:{os.fspath(path_or_repo)}")


__all__ = ["FAMILIES", "ComponentSpec", "Family", "family_of", "from_pretrained"]
