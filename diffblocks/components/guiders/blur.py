"""Gaussian blur of token sequences laid out on an image grid (smoothed-energy guidance, Hong 2024)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

_MSG_GRID = (
    "Smoothed-energy guidance cannot lay {tokens} query tokens on an image grid: the model input is "
    "not 4-D and {tokens} is not a square number. Target attention layers that see only image "
    "tokens of a square image (Flux: 'transformer_blocks.N', not 'single_transformer_blocks.N')."
)


def token_grid(tokens: int, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    """The ``(height, width)`` grid of ``tokens`` image tokens.

    A UNet halves its latent (rounding up) at each level, so the grid is the latent size halved
    until it holds ``tokens``; without a latent size the grid must be square.

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
        raise ValueError(_MSG_GRID.format(tokens=tokens))
    return side, side


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


__all__ = ["blur_tokens", "gaussian_kernel_size", "token_grid"]
