"""A user-written research block, in a module file of its own, as a researcher would publish it."""

from __future__ import annotations

import torch
from pydantic import Field

from diffblocks.blocks import BlockConfig
from diffblocks.blocks.standard import PrepareLatents
from diffblocks.components.noise import Generator


class OffsetNoise(PrepareLatents):
    """Starting noise plus ``offset`` times one Gaussian value per image and channel (Guttenberg, 2023)."""

    class Config(BlockConfig):
        offset: float = Field(0.1, ge=0.0)

    def noise(
        self, shape: tuple[int, ...], generator: Generator | None, *, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        noise = super().noise(shape, generator, device=device, dtype=dtype)
        offset = torch.randn(shape[:2], generator=generator, device=device, dtype=dtype)
        return noise + self.config.offset * offset[:, :, None, None]
