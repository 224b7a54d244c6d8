"""Flux.1 latents: seeded noise or a noised image, packed into 2x2-patch tokens with their position ids, and back."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from diffblocks.blocks.block import Block, BlockIO, component, known
from diffblocks.blocks.errors import FieldError
from diffblocks.blocks.fields import produced
from diffblocks.blocks.sd.encode import Prompt
from diffblocks.blocks.standard.images import ImageLike, check_image, image_size, normalize, snap_size, to_tensor
from diffblocks.blocks.standard.latents import (
    PROMPT_FOR_CHECKS,
    check_batch,
    check_call_size,
    check_generator,
    placement,
    repeat_images,
)
from diffblocks.blocks.standard.vae import encode_latents, vae_scale_factor
from diffblocks.blocks.types import Float
from diffblocks.components.models.autoencoder_kl import AutoencoderKL
from diffblocks.components.models.flux import FluxTransformer2DModel, latent_grid, pack_latents, prepare_image_ids, unpack_latents
from diffblocks.components.noise import Generator, randn_tensor
from diffblocks.components.schedulers.base import AbstractScheduler, SchedulerState

DEFAULT_LATENT_SIZE = 128
"""Latent cells per side of the default image (1024 pixels with the Flux VAE), as diffusers' Flux pipelines use."""

_MSG_SIZE = (
    "{name} {value} is not a positive multiple of {factor} (a token covers 2x2 latent cells of {vae} pixels); "
    "use {below} or {above}"
)


def token_size(vae: AutoencoderKL) -> int:
    """Pixels per side of one packed token: the VAE factor times the 2x2 patch (16 for Flux.1)."""
    return 2 * vae_scale_factor(vae)


def check_flux_size(vae: AutoencoderKL, *, height: int | None, width: int | None) -> None:
    """Sizes must tile into whole tokens: rejected with the nearest valid sizes, not silently rounded down."""
    factor = token_size(vae)
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value <= 0 or value % factor):
            below, above = max(factor, value - value % factor), value - value % factor + factor
            raise FieldError(
                name, _MSG_SIZE.format(name=name, value=value, factor=factor, vae=factor // 2, below=below, above=above)
            )


def check_generators(inputs: BlockIO, device: torch.device) -> None:
    """Generators draw noise for ``device``, one per image when a list is given."""
    check_generator(known(inputs, "generator"), device)
    check_batch(inputs)


class PrepareFluxLatents(Block):
    """Seeded Gaussian latents ``(batch, 16, h/8, w/8)`` drawn as diffusers draws them, packed to tokens, with image ids."""

    class Inputs(BlockIO):
        height: int | None = Field(None, description="image height in pixels, a multiple of 16 (default: 1024)")
        width: int | None = Field(None, description="image width in pixels, a multiple of 16 (default: 1024)")
        batch_size: int
        generator: Generator | None = Field(None, description="a torch.Generator (or one per image) for reproducible noise")
        latents: Float["batch seq channels"] | None = Field(None, description="start from these packed latents")
        prompt: Prompt | None = Field(None, description=PROMPT_FOR_CHECKS)
        num_images_per_prompt: int = Field(1, ge=1, le=64)

    class Outputs(BlockIO):
        latents: Float["batch seq channels"]
        image_ids: Float["seq 3"]
        height: int
        width: int

    vae: AutoencoderKL = component(description="gives the downsampling factor")
    transformer: FluxTransformer2DModel = component(description="latents are made on its device, in its dtype")

    def check(self, inputs: Inputs) -> None:
        check_flux_size(self.vae, height=known(inputs, "height"), width=known(inputs, "width"))
        check_generators(inputs, placement(self.transformer)[0])
        default = DEFAULT_LATENT_SIZE * vae_scale_factor(self.vae)
        check_call_size(self.vae, inputs, self.transformer, default=(default, default))

    def __call__(self, inputs: Inputs) -> Outputs:
        default = DEFAULT_LATENT_SIZE * vae_scale_factor(self.vae)
        height, width = inputs.height or default, inputs.width or default
        device, dtype = placement(self.transformer)
        rows, cols = latent_grid(height, width, vae_scale_factor=vae_scale_factor(self.vae))
        channels = self.transformer.params.in_channels
        if inputs.latents is not None:
            expected = (inputs.batch_size, rows * cols, channels)
            if tuple(inputs.latents.shape) != expected:
                raise ValueError(f"latents have shape {tuple(inputs.latents.shape)}, expected packed {expected}")
            latents = inputs.latents.to(device=device, dtype=dtype)
        else:
            shape = (inputs.batch_size, channels // 4, 2 * rows, 2 * cols)
            latents = pack_latents(randn_tensor(shape, generator=inputs.generator, device=device, dtype=dtype))
        ids = prepare_image_ids(rows, cols, device=device, dtype=dtype)
        return self.Outputs(latents=latents, image_ids=ids, height=height, width=width)


class PreprocessFluxImage(Block):
    """The image to start from as a ``(batch, 3, height, width)`` tensor in [-1, 1], sized to whole tokens."""

    class Inputs(BlockIO):
        image: ImageLike = Field(description="the image to start from")
        height: int | None = Field(None, description="resize to this height, a multiple of 16 (default: the image's, rounded down)")
        width: int | None = Field(None, description="resize to this width, a multiple of 16 (default: the image's, rounded down)")
        prompt: Prompt | None = Field(None, description=PROMPT_FOR_CHECKS)
        num_images_per_prompt: int = Field(1, ge=1, le=64)

    class Outputs(BlockIO):
        pixels: Float["batch 3 height width"]
        height: int
        width: int

    vae: AutoencoderKL = component()

    def check(self, inputs: Inputs) -> None:
        check_flux_size(self.vae, height=known(inputs, "height"), width=known(inputs, "width"))
        check_image(known(inputs, "image"))
        check_batch(inputs)
        check_call_size(self.vae, inputs)

    def __call__(self, inputs: Inputs) -> Outputs:
        height, width = run_size(self.vae, inputs.image, height=inputs.height, width=inputs.width)
        pixels = normalize(to_tensor(inputs.image, height=height, width=width))
        return self.Outputs(pixels=pixels, height=height, width=width)


def run_size(vae: AutoencoderKL, image: ImageLike, *, height: int | None, width: int | None) -> tuple[int, int]:
    """The size a call on ``image`` runs at: ``height``/``width`` where given, else the image's own in whole tokens.

    Raises:
        ValueError: the image is smaller than one token.
    """
    own_height, own_width = snap_size(*image_size(image), token_size(vae))
    height, width = height or own_height, width or own_width
    if height < 1 or width < 1:
        raise ValueError(f"the image is {image_size(image)} pixels, smaller than one {token_size(vae)}-pixel token")
    return height, width


class PrepareFluxImageLatents(Block):
    """Encode the image, noise it to the first kept sigma (``sigma * noise + (1 - sigma) * x0``), and pack it."""

    class Inputs(BlockIO):
        pixels: Float["batch 3 height width"] = produced(description="the image as a tensor in [-1, 1]")
        batch_size: int
        generator: Generator | None = None
        schedule: SchedulerState = produced(description="the scheduler's state for this run")
        prompt: Prompt | None = Field(None, description=PROMPT_FOR_CHECKS)
        num_images_per_prompt: int = Field(1, ge=1, le=64)

    class Outputs(BlockIO):
        latents: Float["batch seq channels"]
        image_latents: Float["batch channels height width"]
        noise: Float["batch channels height width"]
        image_ids: Float["seq 3"]

    vae: AutoencoderKL = component()
    scheduler: AbstractScheduler = component()
    transformer: FluxTransformer2DModel = component()

    def check(self, inputs: Inputs) -> None:
        check_generators(inputs, placement(self.transformer)[0])

    def __call__(self, inputs: Inputs) -> Outputs:
        device, dtype = placement(self.transformer)
        pixels = inputs.pixels.to(device=device, dtype=dtype)
        generator = inputs.generator
        if isinstance(generator, Sequence):
            generator = list(generator[: pixels.shape[0]])  # image i is encoded with generator i, as diffusers does
        image_latents = encode_latents(self.vae, pixels, generator).to(dtype)
        image_latents = repeat_images(image_latents, inputs.batch_size)
        noise = randn_tensor(tuple(image_latents.shape), generator=inputs.generator, device=device, dtype=dtype)
        latents = self.scheduler.add_noise(inputs.schedule, image_latents, noise, 0)
        rows, cols = image_latents.shape[-2] // 2, image_latents.shape[-1] // 2
        ids = prepare_image_ids(rows, cols, device=device, dtype=dtype)
        return self.Outputs(latents=pack_latents(latents), image_latents=image_latents, noise=noise, image_ids=ids)


class UnpackLatents(Block):
    """Packed tokens back to VAE latents ``(batch, channels, height / 8, width / 8)``, ready to decode."""

    class Inputs(BlockIO):
        latents: Float["batch seq channels"]
        height: int
        width: int

    class Outputs(BlockIO):
        latents: Float["batch channels height width"]

    vae: AutoencoderKL = component()

    def __call__(self, inputs: Inputs) -> Outputs:
        factor = vae_scale_factor(self.vae)
        return self.Outputs(latents=unpack_latents(inputs.latents, inputs.height, inputs.width, vae_scale_factor=factor))
