"""Diffusers' folder layout as a pipeline format: what ``Pipeline.from_pretrained`` and ``save_pretrained`` use.

:data:`diffblocks.registry.FORMATS` lists :class:`DiffusersFormat` by module path, so the blocks
layer reaches these functions without importing the presets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, final

from diffblocks.blocks import Pipeline
from diffblocks.blocks.formats import AbstractPipelineFormat
from diffblocks.presets.loading import from_pretrained
from diffblocks.presets.publishing import push_to_hub
from diffblocks.presets.saving import save_pretrained

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo


@final
class DiffusersFormat(AbstractPipelineFormat):
    """``model_index.json`` folders read by family (:func:`~diffblocks.presets.loading.from_pretrained`),
    written with both index files (:func:`~diffblocks.presets.saving.save_pretrained`) and pushed as one
    commit (:func:`~diffblocks.presets.publishing.push_to_hub`)."""

    def load(self, path_or_repo: str | os.PathLike[str], **options: Any) -> Pipeline:
        return from_pretrained(path_or_repo, **options)

    def save(self, pipe: Pipeline, folder: str | os.PathLike[str], **options: Any) -> Path:
        return save_pretrained(pipe, folder, **options)

    def push(self, pipe: Pipeline, repo_id: str, **options: Any) -> CommitInfo:
        return push_to_hub(pipe, repo_id, **options)


__all__ = ["DiffusersFormat"]
