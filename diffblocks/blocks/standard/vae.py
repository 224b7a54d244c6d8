"""Moving between pixels and the denoiser's latent space with an AutoencoderKL."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from diffblocks.components.memory.activations import decode_memory
from diffblocks.components.models.autoencoder_kl import AutoencoderKL, VaeTiling
from diffblocks.components.noise import Generator


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """How many pixels one latent spans per side (8 for SD, SDXL and Flux)."""
    return vae.params.downscale


@contextmanager
def upcast_if_needed(vae: AutoencoderKL) -> Iterator[torch.dtype]:
    """Run a float16 VAE whose config says it overflows (``force_upcast``) in float32, then restore it."""
    dtype = next(vae.parameters()).dtype
    if dtype == torch.float16 and vae.force_upcast:
        vae.to(torch.float32)
        try:
            yield torch.float32
        finally:
            vae.to(dtype)
    else:
        yield dtype


def encode_latents(vae: AutoencoderKL, pixels: Tensor, generator: Generator | None) -> Tensor:
    """Images in [-1, 1] to denoiser latents: a posterior sample, normalised (scale and shift)."""
    with upcast_if_needed(vae) as dtype:
        if isinstance(generator, list):
            samples = [vae.encode(pixels[i : i + 1].to(dtype)).sample(g) for i, g in enumerate(generator)]
            latents = torch.cat(samples)
        else:
            latents = vae.encode(pixels.to(dtype)).sample(generator)
        return vae.normalize_latents(latents)


def decode_latents(vae: AutoencoderKL, latents: Tensor) -> Tensor:
    """Denoiser latents to images in about [-1, 1] (sliced or tiled when a memory budget leaves too little room)."""
    with upcast_if_needed(vae) as dtype, fitted_to_budget(vae, latents.shape, dtype):
        return vae.decode(vae.denormalize_latents(latents.to(dtype)))


@contextmanager
def fitted_to_budget(vae: AutoencoderKL, shape: Sequence[int], dtype: torch.dtype) -> Iterator[None]:
    """Slice or tile this decode when it would not fit the activation room its manager's budget leaves, then restore the VAE's settings."""
    choice = decode_memory(vae, shape, dtype.itemsize)
    if not (choice.slicing or choice.tiling):
        yield
        return
    slicing, tiling = vae.slicing, vae.tiling
    vae.slicing = slicing or choice.slicing
    vae.tiling = tiling if tiling is not None or not choice.tiling else VaeTiling(tile_sample_size=choice.tile)
    try:
        yield
    finally:
        vae.slicing, vae.tiling = slicing, tiling
