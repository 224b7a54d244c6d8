"""Leaving the latent world: decode with the VAE and convert to the requested output type."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor

from diffblocks.blocks.block import Block, BlockIO, component
from diffblocks.blocks.standard.images import OutputType, postprocess
from diffblocks.blocks.standard.vae import decode_latents
from diffblocks.blocks.types import Float
from diffblocks.components.models.autoencoder_kl import AutoencoderKL


class DecodeImages(Block):
    """Decode latents to images as PIL images, a NumPy array, a tensor, or return the latents themselves."""

    class Inputs(BlockIO):
        latents: Float["batch channels height width"]
        output_type: OutputType = Field("pil", description='"pil", "np", "pt" or "latent"')

    class Outputs(BlockIO):
        images: Any

    vae: AutoencoderKL = component()

    def __call__(self, inputs: Inputs) -> Outputs:
        if inputs.output_type == "latent":
            return self.Outputs(images=inputs.latents)
        return self.Outputs(images=postprocess(self.decode(inputs.latents), inputs.output_type))

    def decode(self, latents: Tensor) -> Tensor:
        """Denoiser latents ``(batch, channels, h, w)`` to images ``(batch, 3, H, W)`` in about [-1, 1].

        Override it to decode otherwise (tiled, another decoder); the output type conversion follows.
        """
        return decode_latents(self.vae, latents)
