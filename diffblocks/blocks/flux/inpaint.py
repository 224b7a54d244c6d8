"""Flux.1 inpainting: the image and mask at the run's size, the packed mask, and the per-step blend.

Flux has no inpainting transformer here, so this is the blend that diffusers' ``FluxInpaintPipeline``
runs (Lugmayr et al. 2022, RePaint, without resampling): the image's latents are noised to the
first kept sigma, as in img2img, and after every step the tokens outside the mask are replaced by
the image's latents noised to the next step's sigma, ``sigma * noise + (1 - sigma) * x0``, with the
starting noise. Inside the mask the model paints freely.

The masked image's latents that diffusers also encodes are not made: the blend never reads them,
and they are drawn from the generator after the noise, so leaving them out changes no image.
"""

from __future__ import annotations

from pydantic import Field

from diffblocks.blocks.block import Block, BlockIO, component, known
from diffblocks.blocks.fields import produced
from diffblocks.blocks.flux.latents import check_flux_size, run_size
from diffblocks.blocks.sd.encode import Prompt
from diffblocks.blocks.standard.images import ImageLike, normalize, to_tensor
from diffblocks.blocks.standard.inpaint import check_image_and_mask
from diffblocks.blocks.standard.latents import PROMPT_FOR_CHECKS, check_batch, check_call_size, placement, repeat_images
from diffblocks.blocks.standard.masks import MaskLike, latent_mask, mask_to_tensor
from diffblocks.blocks.standard.vae import vae_scale_factor
from diffblocks.blocks.types import Float
from diffblocks.components.models.autoencoder_kl import AutoencoderKL
from diffblocks.components.models.flux import FluxTransformer2DModel, pack_latents
from diffblocks.components.schedulers.base import AbstractScheduler, SchedulerState


class PreprocessFluxInpaintImages(Block):
    """The image in [-1, 1] and the mask as 0/1, both at the run's size (the image's own, in whole tokens, by default).

    The mask must have the image's size, as for the UNet families: a mask of another size is
    refused before any work rather than stretched over the image.
    """

    class Inputs(BlockIO):
        image: ImageLike = Field(description="the image to repaint")
        mask_image: MaskLike = Field(description="white (1) where the image is repainted, black (0) where it is kept")
        height: int | None = Field(None, description="resize image and mask to this height, a multiple of 16 (default: the image's, rounded down)")
        width: int | None = Field(None, description="resize image and mask to this width, a multiple of 16 (default: the image's, rounded down)")
        prompt: Prompt | None = Field(None, description=PROMPT_FOR_CHECKS)
        num_images_per_prompt: int = Field(1, ge=1, le=64)

    class Outputs(BlockIO):
        pixels: Float["batch 3 height width"]
        pixel_mask: Float["batch 1 height width"]
        height: int
        width: int

    vae: AutoencoderKL = component(description="gives the pixels per token")

    def check(self, inputs: Inputs) -> None:
        check_flux_size(self.vae, height=known(inputs, "height"), width=known(inputs, "width"))
        check_image_and_mask(known(inputs, "image"), known(inputs, "mask_image"))
        check_batch(inputs)
        check_call_size(self.vae, inputs)

    def __call__(self, inputs: Inputs) -> Outputs:
        height, width = run_size(self.vae, inputs.image, height=inputs.height, width=inputs.width)
        pixels = normalize(to_tensor(inputs.image, height=height, width=width))
        mask = mask_to_tensor(inputs.mask_image, height=height, width=width)
        return self.Outputs(pixels=pixels, pixel_mask=mask, height=height, width=width)


class PrepareFluxMaskLatents(Block):
    """The mask on the latent grid (nearest neighbours), for every channel, packed into tokens like the latents."""

    class Inputs(BlockIO):
        pixel_mask: Float["batch 1 height width"] = produced(description="the mask as 0/1 at the image's size")
        batch_size: int

    class Outputs(BlockIO):
        mask: Float["batch seq channels"]

    vae: AutoencoderKL = component(description="gives the downsampling factor")
    transformer: FluxTransformer2DModel = component(description="the mask is made on its device, in its dtype")

    def __call__(self, inputs: Inputs) -> Outputs:
        device, dtype = placement(self.transformer)
        mask = latent_mask(inputs.pixel_mask, factor=vae_scale_factor(self.vae)).to(device=device, dtype=dtype)
        mask = repeat_images(mask, inputs.batch_size)
        # one value per latent cell, copied to each channel so that it lines up with the packed tokens' (c, dy, dx)
        channels = self.transformer.params.in_channels // 4
        return self.Outputs(mask=pack_latents(mask.expand(-1, channels, -1, -1)))


class BlendFluxMaskedLatents(Block):
    """After a step, keep the image outside the mask, noised to the next step's sigma (the last step keeps it clean)."""

    class Inputs(BlockIO):
        latents: Float["batch seq channels"]
        image_latents: Float["batch channels height width"] = produced(description="the image's latents")
        noise: Float["batch channels height width"] = produced(description="the starting noise")
        mask: Float["batch seq channels"] = produced(description="the packed mask: 1 where the image is repainted")
        schedule: SchedulerState = produced(description="the scheduler's state for this run")
        step_index: int

    class Outputs(BlockIO):
        latents: Float["batch seq channels"]

    scheduler: AbstractScheduler = component()

    def __call__(self, inputs: Inputs) -> Outputs:
        original, following = inputs.image_latents, inputs.step_index + 1
        if following < len(inputs.schedule.timesteps):
            original = self.scheduler.add_noise(inputs.schedule, original, inputs.noise, following)
        mask = inputs.mask
        return self.Outputs(latents=(1 - mask) * pack_latents(original) + mask * inputs.latents)


__all__ = ["BlendFluxMaskedLatents", "PrepareFluxMaskLatents", "PreprocessFluxInpaintImages"]
