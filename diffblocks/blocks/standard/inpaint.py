"""Inpainting set-up: the image and mask at the run's size, the starting latents, and the mask latents.

The generator is drawn from in diffusers' order, so one seed gives diffusers' image: the image is
encoded first (when the denoiser needs its latents or ``strength < 1``), then the starting noise
is drawn, then the masked image is encoded.
"""

from __future__ import annotations


import torch
from pydantic import Field
from torch import Tensor

from diffblocks.blocks.block import Block, BlockIO, component, known
from diffblocks.blocks.errors import FieldError
from diffblocks.blocks.fields import produced
from diffblocks.blocks.standard.images import ImageLike, check_image, image_size, normalize, snap_size, to_tensor
from diffblocks.blocks.standard.inpaint_loop import inpaint_mode
from diffblocks.blocks.sd.encode import Prompt
from diffblocks.blocks.standard.latents import (
    PROMPT_FOR_CHECKS,
    check_batch,
    check_call_size,
    check_generator,
    check_size,
    placement,
    repeat_images,
)
from diffblocks.blocks.standard.masks import MaskLike, check_mask_shape, latent_mask, mask_size, mask_to_tensor
from diffblocks.blocks.standard.timesteps import AbstractSetPartialTimesteps, StrengthInputs
from diffblocks.blocks.standard.vae import encode_latents, vae_scale_factor
from diffblocks.blocks.types import Float
from diffblocks.components.models.autoencoder_kl import AutoencoderKL
from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.components.noise import Generator, randn_tensor
from diffblocks.components.schedulers.base import AbstractScheduler, SchedulerState

_STRENGTH = "how much of the schedule to run; 1 starts from pure noise and ignores the image under the mask"


class SetInpaintTimesteps(AbstractSetPartialTimesteps):
    """Make the run's schedule and keep its last ``strength`` part (inpainting runs it all by default)."""

    class Inputs(StrengthInputs):
        strength: float = Field(1.0, gt=0.0, le=1.0, description=_STRENGTH)


class PrepareInpaintImages(Block):
    """Read the image in [-1, 1] and the mask as 0/1 at the run's size (the image's own size by default)."""

    class Inputs(BlockIO):
        image: ImageLike = Field(description="the image to repaint")
        mask_image: MaskLike = Field(description="white (1) where the image is repainted, black (0) where it is kept")
        height: int | None = Field(None, description="resize image and mask to this height (default: the image's, snapped)")
        width: int | None = Field(None, description="resize image and mask to this width (default: the image's, snapped)")
        prompt: Prompt | None = Field(None, description=PROMPT_FOR_CHECKS)
        num_images_per_prompt: int = Field(1, ge=1, le=64)

    class Outputs(BlockIO):
        pixels: Float["batch channels height width"]
        pixel_mask: Float["batch channels height width"]
        height: int
        width: int

    vae: AutoencoderKL = component(description="gives the downsampling factor")

    def check(self, inputs: Inputs) -> None:
        check_size(vae_scale_factor(self.vae), height=known(inputs, "height"), width=known(inputs, "width"))
        mask, image = known(inputs, "mask_image"), known(inputs, "image")
        if mask is None or image is None:
            return  # made by earlier blocks: checked when they run
        check_image_and_mask(image, mask)
        check_batch(inputs)
        check_call_size(self.vae, inputs)

    def __call__(self, inputs: Inputs) -> Outputs:
        height, width = snap_size(*image_size(inputs.image), vae_scale_factor(self.vae))
        height, width = inputs.height or height, inputs.width or width
        pixels = normalize(to_tensor(inputs.image, height=height, width=width))
        mask = mask_to_tensor(inputs.mask_image, height=height, width=width)
        return self.Outputs(pixels=pixels, pixel_mask=mask, height=height, width=width)


def check_image_and_mask(image: ImageLike | None, mask: MaskLike | None) -> None:
    """Refuse a bad image, a mask of a wrong layout, or a mask of another size than the image (not stretched over it).

    Either may be None (made by an earlier block): what is known is checked.

    Raises:
        FieldError: naming ``image`` or ``mask_image``.
    """
    check_image(image)
    if mask is None:
        return
    try:
        check_mask_shape(mask)
    except ValueError as err:
        raise FieldError("mask_image", str(err)) from None
    if image is None:
        return
    image_hw, mask_hw = image_size(image), mask_size(mask)
    if image_hw != mask_hw:
        raise FieldError(
            "mask_image",
            f"mask_image is {mask_hw[0]}x{mask_hw[1]} but image is {image_hw[0]}x{image_hw[1]} (height x width); "
            "give a mask of the image's size",
        )


class PrepareInpaintLatents(Block):
    """Starting latents: the image's latents noised to the first step, or pure noise at ``strength`` 1."""

    class Inputs(BlockIO):
        pixels: Float["batch channels height width"] = produced(description="the image as a tensor in [-1, 1]")
        batch_size: int
        generator: Generator | None = Field(None, description="a torch.Generator (or one per image) for reproducible noise")
        latents: Float["batch channels height width"] | None = Field(None, description="start from this noise")
        schedule: SchedulerState = produced(description="the scheduler's state for this run")
        strength: float = Field(1.0, gt=0.0, le=1.0, description=_STRENGTH)
        prompt: Prompt | None = Field(None, description=PROMPT_FOR_CHECKS)
        num_images_per_prompt: int = Field(1, ge=1, le=64)

    class Outputs(BlockIO):
        latents: Float["batch channels height width"]
        noise: Float["batch channels height width"]
        image_latents: Float["batch channels height width"] | None

    vae: AutoencoderKL = component()
    scheduler: AbstractScheduler = component()
    unet: UNet2DConditionModel = component(description="a 9-channel inpainting UNet or a plain 4-channel one")

    def check(self, inputs: Inputs) -> None:
        try:
            inpaint_mode(self.unet, self.vae)
        except ValueError as err:
            raise FieldError("unet", str(err)) from None
        check_generator(known(inputs, "generator"), placement(self.unet)[0])
        check_batch(inputs)

    def __call__(self, inputs: Inputs) -> Outputs:
        device, dtype = placement(self.unet)
        pixels = inputs.pixels.to(device=device, dtype=dtype)
        image_latents = None
        if inpaint_mode(self.unet, self.vae) == "blend" or inputs.strength < 1.0:
            image_latents = repeat_images(_encode(self.vae, pixels, inputs.generator).to(dtype), inputs.batch_size)
        factor = vae_scale_factor(self.vae)
        shape = (inputs.batch_size, self.vae.params.latent_channels, pixels.shape[-2] // factor, pixels.shape[-1] // factor)
        if inputs.latents is not None:
            if tuple(inputs.latents.shape) != shape:
                raise ValueError(f"latents have shape {tuple(inputs.latents.shape)}, expected {shape}")
            noise = inputs.latents.to(device=device, dtype=dtype)
            latents = noise * inputs.schedule.init_noise_sigma
        else:
            noise = randn_tensor(shape, generator=inputs.generator, device=device, dtype=dtype)
            if image_latents is None or inputs.strength == 1.0:
                latents = noise * inputs.schedule.init_noise_sigma
            else:
                latents = self.scheduler.add_noise(inputs.schedule, image_latents, noise, 0)
        return self.Outputs(latents=latents, noise=noise, image_latents=image_latents)


class PrepareMaskLatents(Block):
    """The mask on the latent grid, and the latents of the image with the repainted part blanked out."""

    class Inputs(BlockIO):
        pixels: Float["batch channels height width"] = produced(description="the image as a tensor in [-1, 1]")
        pixel_mask: Float["batch channels height width"] = produced(description="the mask as 0/1 at the image's size")
        batch_size: int
        generator: Generator | None = None

    class Outputs(BlockIO):
        mask: Float["batch channels height width"]
        masked_image_latents: Float["batch channels height width"]

    vae: AutoencoderKL = component()
    unet: UNet2DConditionModel = component()

    def __call__(self, inputs: Inputs) -> Outputs:
        device, dtype = placement(self.unet)
        mask = latent_mask(inputs.pixel_mask, factor=vae_scale_factor(self.vae)).to(device=device, dtype=dtype)
        masked = (inputs.pixels * (inputs.pixel_mask < 0.5)).to(device=device, dtype=dtype)
        masked_latents = _encode(self.vae, masked, inputs.generator).to(dtype)
        return self.Outputs(
            mask=repeat_images(mask, inputs.batch_size), masked_image_latents=repeat_images(masked_latents, inputs.batch_size)
        )


def _encode(vae: AutoencoderKL, pixels: Tensor, generator: Generator | None) -> Tensor:
    # With one generator per output image, the i-th image is encoded with the i-th generator.
    if isinstance(generator, torch.Generator) or generator is None:
        return encode_latents(vae, pixels, generator)
    return encode_latents(vae, pixels, list(generator)[: pixels.shape[0]])


__all__ = ["PrepareInpaintImages", "PrepareInpaintLatents", "PrepareMaskLatents", "SetInpaintTimesteps", "check_image_and_mask"]
