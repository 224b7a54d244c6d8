"""How a pipeline is read from and written to a folder: the interface here, the implementations above.

``Pipeline.from_pretrained``, ``save_pretrained`` and ``push_to_hub`` are where users look, but
reading diffusers' layout needs the model families of :mod:`diffblocks.presets`, which are built
from blocks. So this layer declares what a format does and finds the implementation by name in
:data:`diffblocks.registry.FORMATS`, where the built-in one is a module path imported on first use:
nothing in ``diffblocks.blocks`` imports ``diffblocks.presets``. A plugin ships another format under
the ``diffblocks.formats`` entry-point group. What a format needs to know of the preset a pipeline
was built from (its family and settings) is the pipeline's :class:`PresetInfo`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffblocks.registry import DIFFUSERS_FORMAT, FORMATS, Key, Registry, RegistryError

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from diffblocks.blocks.pipeline import Pipeline

_MSG_NOT_A_FORMAT = "pipeline format {key} is {cls}, which is not an AbstractPipelineFormat subclass"


@dataclass(frozen=True)
class PresetInfo:
    """What saving needs to know about a preset pipeline: its family, index class name and settings.

    ``Pipeline.from_pretrained`` records it; set it yourself (``Pipeline(..., preset=...)``) for a
    preset built by hand whose family cannot be recognised from its blocks.

    Args:
        family: a key of :data:`diffblocks.presets.FAMILIES` (``"sd15"``, ``"sdxl"``, ...).
        class_name: the index ``_class_name``; None means the family's first class name.
        settings: the index's plain values beside the components (``requires_safety_checker``, ...).
        sources: portable references (``package://...``) of local folders the index named, by folder.
    """

    family: str
    class_name: str | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)


class AbstractPipelineFormat(ABC):
    """Reads pipelines from, and writes them to, folders and Hub repositories of one layout."""

    @abstractmethod
    def load(self, path_or_repo: str | os.PathLike[str], **options: Any) -> Pipeline:
        """A ready pipeline for a folder or Hub id."""

    @abstractmethod
    def save(self, pipe: Pipeline, folder: str | os.PathLike[str], **options: Any) -> Path:
        """Write ``pipe`` to ``folder`` so that :meth:`load` rebuilds it; returns the folder."""

    @abstractmethod
    def push(self, pipe: Pipeline, repo_id: str, **options: Any) -> CommitInfo:
        """Save ``pipe`` and upload it to a Hub repository as one commit."""

    def load_single_file(
        self, path_or_hub_file: str | os.PathLike[str], config: str | os.PathLike[str] | None = None, **options: Any
    ) -> Pipeline:
        """A ready pipeline from one single-file checkpoint, completed by a repository of this layout.

        Raises:
            NotImplementedError: the format reads no single files (the default).
        """
        raise NotImplementedError(f"{type(self).__name__} reads no single-file checkpoints")


def pipeline_format(key: Key = DIFFUSERS_FORMAT, *, registry: Registry = FORMATS) -> AbstractPipelineFormat:
    """The format registered under ``key`` (default: diffusers' layout, as the ``Pipeline`` methods use).

    Raises:
        RegistryError: ``key`` is not registered, or names a class that is not a format.
    """
    cls = registry.resolve(key)
    if not issubclass(cls, AbstractPipelineFormat):
        qualified = f"{cls.__module__}.{cls.__qualname__}"
        raise RegistryError(_MSG_NOT_A_FORMAT.format(key=f"{key[0]}.{key[1]}", cls=qualified))
    return cls()


__all__ = ["AbstractPipelineFormat", "PresetInfo", "pipeline_format"]
