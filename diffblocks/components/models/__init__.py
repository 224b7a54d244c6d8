"""Models (one family per folder) on a common base that loads and saves diffusers folders."""

from diffblocks.components.models.base import AbstractModel, AbstractParams
from diffblocks.components.models.buffers import AbstractComputedBuffers
from diffblocks.components.models.loading import CheckpointError

__all__ = ["AbstractComputedBuffers", "AbstractModel", "AbstractParams", "CheckpointError"]
