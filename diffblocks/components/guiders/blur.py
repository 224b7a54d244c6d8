"""Gaussian blur of token sequences laid out on an image grid (smoothed-energy guidance, Hong 2024)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

_MSG_GRID = (
    "Smoothed-energy guidance cannot lay {tokens} query tokens on an image grid: {known}, and "
    "{tokens} is not a square number. Target attention layers that see only the image tokens "
    "(Flux: 'transformer_blocks.N', not 'single_transformer_blocks.N', whose queries include the text)."
)


def token_grid(tokens: int, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    """The ``(height, width)`` grid of ``tokens`` image tokens.

    A UNet halves its latent (rounding up) at each level, so the grid is the latent size halved
    until it holds ``tokens`` (a Flux token grid holds them at once); without a size the grid must
    be square.

    Args:
        tokens: number of query tokens.
        latent_hw: the model input's ``(height, width)``, or Flux's token grid (:func:`ids_grid`).

    Raises:
        ValueError: no grid fits.
    """
    if latent_hw is not None:
        height, width = latent_hw
        while height * width > tokens:
            height, width = -(-height // 2), -(-width // 2)
        if height * width == tokens:
            return height, width
    side = math.isqrt(tokens)
    if side * side != tokens:
        known = f"no {latent_hw[0]}x{latent_hw[1]} grid halved holds them" if latent_hw else "the grid size is unknown"
        raise ValueError(_MSG_GRID.format(tokens=tokens, known=known))
    return side, side


def ids_grid(ids: Float[Tensor, "... seq axes"]) -> tuple[int, int]:
    """The ``(rows, columns)`` of Flux image position ids ``(index, row, column)`` (``prepare_image_ids``).

    Reads the ids once (a device sync); the caller keeps the result while the ids stay the same.
    """
    rows_cols = ids.reshape(-1, ids.shape[-1])[:, 1:3].float()
    low, high = rows_cols.amin(dim=0).tolist(), rows_cols.amax(dim=0).tolist()
    return round(high[0] - low[0]) + 1, round(high[1] - low[1]) + 1


def gaussian_kernel_size(sigma: float, grid: tuple[int, int]) -> int:
    """Odd kernel width covering ±3 sigma, capped so reflect padding fits the grid (as SEG-SDXL does)."""
    size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    side = min(grid)
    return min(size, side - (side % 2 - 1))


def blur_tokens(
    tokens: Float[Tensor, "batch seq dim"],
    grid: tuple[int, int],
    *,
    sigma: float,
    threshold_inf: float,
) -> Float[Tensor, "batch seq dim"]:
    """Blur each channel of ``tokens`` over the ``grid``; infinite blur (``sigma > threshold_inf``) is the mean.

    Args:
        tokens: ``(batch, height * width, dim)``, row-major over the grid.
        grid: ``(height, width)``.
        sigma: Gaussian standard deviation in tokens.
        threshold_inf: ``sigma`` above this means infinite blur (the global mean over the grid).
    """
    height, width = grid
    image = rearrange(tokens, "b (h w) c -> b c h w", h=height, w=width)
    if sigma > threshold_inf:
        blurred = image.mean(dim=(-2, -1), keepdim=True).expand_as(image)
    else:
        size = gaussian_kernel_size(sigma, grid)
        half = (size - 1) / 2
        pdf = torch.exp(-0.5 * (torch.linspace(-half, half, steps=size) / sigma).pow(2))
        kernel = (pdf / pdf.sum()).to(image)
        channels = image.shape[1]
        padded = F.pad(image, [size // 2] * 4, mode="reflect")
        # The 2-D Gaussian is separable: one pass along rows, one along columns.
        rows = F.conv2d(padded, kernel.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
        blurred = F.conv2d(rows, kernel.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)
    return rearrange(blurred, "b c h w -> b (h w) c")


__all__ = ["blur_tokens", "gaussian_kernel_size", "ids_grid", "token_grid"]
