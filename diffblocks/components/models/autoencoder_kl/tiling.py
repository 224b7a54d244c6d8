"""Tiled encoding and decoding: process overlapping tiles and cross-fade the overlaps.

Memory then stays constant in the image size. The tile layout and the linear cross-fade are those
of diffusers' ``AutoencoderKL`` tiling, so both give the same result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import final

import torch
from torch import Tensor


@final
@dataclass(frozen=True)
class VaeTiling:
    """Tile settings.

    Args:
        tile_sample_size: tile side in pixels; None uses the autoencoder's ``sample_size``.
        overlap: fraction of a tile shared with each neighbour, in [0, 1).
    """

    tile_sample_size: int | None = None
    overlap: float = 0.25

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap {self.overlap} must be in [0, 1)")
        if self.tile_sample_size is not None and self.tile_sample_size <= 0:
            raise ValueError(f"tile_sample_size {self.tile_sample_size} must be positive")


def _cross_fade(prev: Tensor, tile: Tensor, extent: int, dim: int) -> None:
    """Blend the first ``extent`` rows (dim 2) or columns (dim 3) of ``tile`` with ``prev``'s last ones, in place."""
    extent = min(prev.shape[dim], tile.shape[dim], extent)
    if extent == 0:
        return
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    # Weights in float64 and rounded once, as Python-scalar arithmetic does it.
    w = (torch.arange(extent, dtype=torch.float64, device=tile.device) / extent).reshape(shape)
    head = tile.narrow(dim, 0, extent)
    tail = prev.narrow(dim, prev.shape[dim] - extent, extent)
    head.copy_(tail * (1 - w).to(tile.dtype) + head * w.to(tile.dtype))


def tiled_map(x: Tensor, fn: Callable[[Tensor], Tensor], *, tile_in: int, tile_out: int, overlap: float) -> Tensor:
    """Apply ``fn`` to overlapping ``tile_in``-sized tiles of ``x`` and stitch the ``tile_out``-sized results.

    Args:
        x: ``(batch, channels, height, width)``.
        fn: maps a tile to an output ``tile_out / tile_in`` times its size.
        tile_in: input tile side; tiles start every ``tile_in * (1 - overlap)`` pixels.
        tile_out: output tile side; each output tile keeps ``tile_out * (1 - overlap)`` after blending.
        overlap: overlap fraction.
    """
    step = int(tile_in * (1 - overlap))
    extent = int(tile_out * overlap)
    keep = tile_out - extent
    rows = [
        [fn(x[:, :, i : i + tile_in, j : j + tile_in]) for j in range(0, x.shape[3], step)]
        for i in range(0, x.shape[2], step)
    ]
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _cross_fade(rows[i - 1][j], tile, extent, dim=2)
            if j > 0:
                _cross_fade(row[j - 1], tile, extent, dim=3)
    return torch.cat([torch.cat([t[:, :, :keep, :keep] for t in row], dim=3) for row in rows], dim=2)


__all__ = ["VaeTiling", "tiled_map"]
