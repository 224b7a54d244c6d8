"""Moving between pixels and the denoiser's latent space with an AutoencoderKL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from diffblocks.components.models.autoencoder_kl import AutoencoderKL
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
    """Denoiser latents to images in about [-1, 1]."""
    with upcast_if_needed(vae) as dtype:
        return vae.decode(vae.denormalize_latents(latents.to(dtype)))
