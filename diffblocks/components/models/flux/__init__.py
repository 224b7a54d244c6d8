"""Flux.1 (dev, schnell): the transformer, its params, and the packed-latent layout."""

from diffblocks.components.models.flux.latents import (
    latent_grid,
    pack_latents,
    prepare_image_ids,
    prepare_text_ids,
    unpack_latents,
)
from diffblocks.components.models.flux.params import FLUX_DEV, FLUX_SCHNELL, FluxParams
from diffblocks.components.models.flux.transformer import FluxTransformer2DModel

__all__ = [
    "FLUX_DEV",
    "FLUX_SCHNELL",
    "FluxParams",
    "FluxTransformer2DModel",
    "latent_grid",
    "pack_latents",
    "prepare_image_ids",
    "prepare_text_ids",
    "unpack_latents",
]
