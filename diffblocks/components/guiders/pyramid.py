"""Laplacian pyramids (Burt & Adelson 1983) of ``(batch, channels, height, width)`` tensors.

Follows kornia's ``build_laplacian_pyramid`` and ``pyrup``, which frequency-decoupled guidance was
published with: a 5x5 binomial blur with reflect borders and bilinear resizing; odd sizes are
reflect-padded up to a power of two. :func:`collapse` inverts :func:`laplacian_pyramid` exactly.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur(image: Tensor) -> Tensor:
    channels = image.shape[1]
    kernel = torch.outer(_BINOMIAL, _BINOMIAL).to(image).expand(channels, 1, 5, 5)
    return F.conv2d(F.pad(image, [2, 2, 2, 2], mode="reflect"), kernel, groups=channels)


def _down(image: Tensor) -> Tensor:
    height, width = image.shape[-2:]
    return F.interpolate(_blur(image), size=(height // 2, width // 2), mode="bilinear", align_corners=False)


def upsample(image: Tensor) -> Tensor:
    """Double the size bilinearly, then blur (kornia's ``pyrup``)."""
    height, width = image.shape[-2:]
    return _blur(F.interpolate(image, size=(height * 2, width * 2), mode="bilinear", align_corners=False))


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def padded_size(height: int, width: int, levels: int) -> tuple[int, int]:
    """The size :func:`laplacian_pyramid` works at: as given when ``levels`` halvings divide it, else
    each side reflect-padded up to a power of two."""
    stride = 1 << (levels - 1)
    if not (_is_power_of_two(height) or _is_power_of_two(width)) or height % stride or width % stride:
        return 1 << (height - 1).bit_length(), 1 << (width - 1).bit_length()
    return height, width


@functools.cache  # asked again at every step with the same latent size
def max_levels(height: int, width: int) -> int:
    """The most levels a ``height`` x ``width`` image splits into.

    Each level halves the padded size, and the 5x5 reflect-padded blur of the upsampled coarsest
    level needs it at least 2x2; one level (the image itself) always fits.
    """
    levels = 1
    while True:
        padded_height, padded_width = padded_size(height, width, levels + 1)
        if min(padded_height, padded_width) >> levels < 2:
            return levels
        levels += 1


def laplacian_pyramid(image: Float[Tensor, "batch channels height width"], levels: int) -> list[Tensor]:
    """Band-pass levels from fine to coarse, the last one the coarsest Gaussian level.

    Args:
        image: ``(batch, channels, height, width)``.
        levels: number of levels returned (1 returns the image itself).
    """
    height, width = image.shape[-2:]
    padded_height, padded_width = padded_size(height, width, levels)
    if (padded_height, padded_width) != (height, width):
        image = F.pad(image, [0, padded_width - width, 0, padded_height - height], mode="reflect")
    gaussians = [image]
    for _ in range(levels - 1):
        gaussians.append(_down(gaussians[-1]))
    bands = [fine - upsample(coarse) for fine, coarse in zip(gaussians[:-1], gaussians[1:])]
    return [*bands, gaussians[-1]]


def collapse(pyramid: list[Tensor]) -> Tensor:
    """The image a :func:`laplacian_pyramid` came from (at its padded size)."""
    image = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        image = upsample(image) + band
    return image


__all__ = ["collapse", "laplacian_pyramid", "max_levels", "padded_size", "upsample"]
