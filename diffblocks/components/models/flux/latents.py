"""Flux.1 latent layout: 2x2 patch packing and the position ids the diffusers Flux pipeline builds."""

from __future__ import annotations

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor


def pack_latents(latents: Float[Tensor, "batch channels height width"]) -> Float[Tensor, "batch seq packed"]:
    """Fold every 2x2 latent patch into one token: ``(b, c, h, w) -> (b, h/2 * w/2, c * 4)``.

    Tokens run row-major over the patch grid; a token's channels are ``(c, dy, dx)``.

    Args:
        latents: VAE latents with even height and width.
    """
    height, width = latents.shape[-2:]
    if height % 2 or width % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {height}x{width}")
    return rearrange(latents, "b c (h dy) (w dx) -> b (h w) (c dy dx)", dy=2, dx=2)


def unpack_latents(
    x: Float[Tensor, "batch seq packed"], height: int, width: int, *, vae_scale_factor: int = 8
) -> Float[Tensor, "batch channels latent_height latent_width"]:
    """Inverse of :func:`pack_latents`, given the image size in pixels.

    Args:
        x: packed tokens.
        height: image height in pixels.
        width: image width in pixels.
        vae_scale_factor: pixels per latent cell (8 for the Flux VAE).

    Returns:
        latents of ``2 * (height // (2 * vae_scale_factor))`` rows, and likewise columns; sizes are
        rounded down to whole patches exactly as diffusers' pipeline rounds them.
    """
    grid_h, grid_w = latent_grid(height, width, vae_scale_factor=vae_scale_factor)
    if x.shape[1] != grid_h * grid_w:
        raise ValueError(
            f"{x.shape[1]} tokens do not tile a {height}x{width} image: expected {grid_h}x{grid_w} = "
            f"{grid_h * grid_w} (vae_scale_factor {vae_scale_factor})"
        )
    return rearrange(x, "b (h w) (c dy dx) -> b c (h dy) (w dx)", h=grid_h, w=grid_w, dy=2, dx=2)


def latent_grid(height: int, width: int, *, vae_scale_factor: int = 8) -> tuple[int, int]:
    """Token grid ``(rows, cols)`` of a ``height x width`` pixel image: one token per 2x2 latent patch."""
    return height // (vae_scale_factor * 2), width // (vae_scale_factor * 2)


def prepare_image_ids(
    grid_height: int,
    grid_width: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Float[Tensor, "seq 3"]:
    """Position ids of the packed image tokens: ``(0, row, col)`` per token, row-major.

    Args:
        grid_height: token rows (latent height / 2).
        grid_width: token columns (latent width / 2).
    """
    # Built in float32 and cast once, as diffusers does, so half-precision ids round identically.
    ids = torch.zeros(grid_height, grid_width, 3)
    ids[..., 1] = torch.arange(grid_height)[:, None]
    ids[..., 2] = torch.arange(grid_width)[None, :]
    return rearrange(ids, "h w axes -> (h w) axes").to(device=device, dtype=dtype)


def prepare_text_ids(
    seq_len: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Float[Tensor, "seq 3"]:
    """Position ids of the text tokens: all zeros, so text carries no spatial rotation."""
    return torch.zeros(seq_len, 3, dtype=dtype, device=device)
