"""Starting latents: seeded noise for text-to-image, noised image latents for image-to-image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from diffblocks.blocks.block import Block, BlockIO, component, known
from diffblocks.blocks.errors import FieldError
from diffblocks.blocks.fields import produced
from diffblocks.blocks.sd.encode import Prompt, as_list
from diffblocks.blocks.standard.images import (
    ImageLike,
    check_image,
    image_range_problem,
    image_size,
    normalize,
    snap_size,
    to_tensor,
)
from diffblocks.blocks.standard.limits import check_run_size
from diffblocks.blocks.standard.vae import encode_latents, vae_scale_factor
from diffblocks.blocks.types import Float
from diffblocks.components.memory import execution_device
from diffblocks.components.models.autoencoder_kl import AutoencoderKL
from diffblocks.components.models.flux.params import FluxParams
from diffblocks.components.models.unet.params import UNet2DConditionParams
from diffblocks.components.noise import Generator, check_generator_device, randn_tensor
from diffblocks.components.schedulers.base import AbstractScheduler, SchedulerState

PROMPT_FOR_CHECKS = "the prompts, read to check the generators and images against the batch before any encoder runs"


def placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a module's first parameter: where a block puts the tensors it makes for it.

    Under an offload policy the device is where the module runs, not where its weights wait. A
    quantized layer's weight may be its storage (ModelOpt keeps ``int8`` and ``float8`` weights as
    parameters), so the dtype is that of the first parameter in a compute dtype.
    """
    parameters = list(module.parameters())
    computed = next((p for p in parameters if p.dtype in _COMPUTE_DTYPES), parameters[0])
    return execution_device(module) or parameters[0].device, computed.dtype


_COMPUTE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def check_size(factor: int, *, height: int | None, width: int | None) -> None:
    """Sizes must be positive multiples of the VAE's downsampling factor."""
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value <= 0 or value % factor):
            below, above = max(factor, value - value % factor), value - value % factor + factor
            raise FieldError(name, f"{name} {value} is not a positive multiple of {factor} (the VAE factor); use {below} or {above}")


def check_call_size(
    vae: AutoencoderKL,
    inputs: BlockIO,
    denoiser: torch.nn.Module | None = None,
    *,
    default: tuple[int, int] | None = None,
) -> None:
    """The call's size and batch within :mod:`~diffblocks.blocks.standard.limits`.

    A size not given is the image's (snapped), else ``default`` (the model's native size).
    """
    height, width = known(inputs, "height"), known(inputs, "width")
    image = known(inputs, "image")
    if image is not None and (height is None or width is None) and image_range_problem(image) is None:
        default = snap_size(*image_size(image), vae_scale_factor(vae))
    if default is not None:
        height, width = height or default[0], width or default[1]
    found = known_batch(inputs)
    check_run_size(vae, height=height, width=width, batch=found[0] if found else None, denoiser=denoiser_width(denoiser))


def denoiser_width(model: torch.nn.Module | None) -> tuple[int, torch.dtype] | None:
    """Channels per latent cell of a denoiser's first activation, and its dtype (None when its params do not say)."""
    params = getattr(model, "params", None)
    if isinstance(params, UNet2DConditionParams):
        channels = params.block_out_channels[0]  # its first level, at the latents' resolution
    elif isinstance(params, FluxParams):
        channels = params.num_attention_heads * params.attention_head_dim // 4  # one token covers 2x2 latent cells
    else:
        return None
    assert model is not None
    return channels, placement(model)[1]


def check_plain_unet(unet: torch.nn.Module, vae: AutoencoderKL) -> None:
    """Text-to-image and image-to-image need a UNet that takes the latents alone (not an inpainting UNet)."""
    in_channels = getattr(getattr(unet, "params", None), "in_channels", None)
    latent_channels = vae.params.latent_channels
    if isinstance(in_channels, int) and in_channels != latent_channels:
        raise FieldError(
            "mask_image",
            f"the UNet takes {in_channels} input channels, not the VAE's {latent_channels}: it is an inpainting "
            "model, so give image= and mask_image= (or load a text-to-image UNet)",
        )


def check_generator(generator: Generator | None, device: torch.device) -> None:
    """Generators must draw noise for ``device``."""
    try:
        check_generator_device(generator, device)
    except ValueError as err:
        raise FieldError("generator", str(err)) from None


def image_count(image: object) -> int:
    """How many images an image input holds: a list's length, a 4-D array's or tensor's first axis, else 1."""
    if isinstance(image, list):
        return len(image)
    shape = getattr(image, "shape", ())
    return int(shape[0]) if len(shape) == 4 else 1


def known_batch(inputs: BlockIO) -> tuple[int, str] | None:
    """The images a call makes, and how to say so, as far as the block's own inputs tell before the run.

    The batch is ``batch_size`` when the caller gives it, else the prompts times
    ``num_images_per_prompt``: a block that declares ``prompt`` and ``num_images_per_prompt``
    (defaulting to None and 1) knows it before any encoder runs. None when neither is known.
    """
    batch, prompt = known(inputs, "batch_size"), known(inputs, "prompt")
    per_prompt = known(inputs, "num_images_per_prompt") or 1
    if batch is not None:
        return batch, f"batch_size {batch}"
    if prompt is None:
        return None  # made by an earlier block: checked when the noise is drawn
    prompts = len(as_list(prompt))
    return prompts * per_prompt, f"{prompts * per_prompt} images ({prompts} prompts x num_images_per_prompt {per_prompt})"


def check_batch(inputs: BlockIO) -> None:
    """A list of generators has one per image, and the images divide the batch, as far as the caller gave them (see :func:`known_batch`)."""
    found = known_batch(inputs)
    if found is None:
        return
    batch, made = found
    generator = known(inputs, "generator")
    if isinstance(generator, Sequence) and not isinstance(generator, torch.Generator) and len(generator) != batch:
        raise FieldError("generator", f"{len(generator)} generators for {made}; give one per image, or a single generator")
    image = known(inputs, "image")
    if image is not None and batch % image_count(image):
        raise FieldError(
            "image",
            f"{image_count(image)} images for {made}; give one image for all, or one per prompt "
            "(each is repeated num_images_per_prompt times)",
        )


class PrepareLatents(Block):
    """Seeded Gaussian latents scaled for the first timestep, drawn as diffusers draws them."""

    class Inputs(BlockIO):
        height: int | None = Field(None, description="image height in pixels (default: the model's native size)")
        width: int | None = Field(None, description="image width in pixels (default: the model's native size)")
        batch_size: int
        generator: Generator | None = Field(None, description="a torch.Generator (or one per image) for reproducible noise")
        latents: Float["batch channels height width"] | None = Field(None, description="start from these latents")
        schedule: SchedulerState = produced(description="the scheduler's state for this run")
        prompt: Prompt | None = Field(None, description=PROMPT_FOR_CHECKS)
        num_images_per_prompt: int = Field(1, ge=1, le=64)

    class Outputs(BlockIO):
        latents: Float["batch channels height width"]
        height: int
        width: int

    vae: AutoencoderKL = component(description="gives the latent channels and the downsampling factor")
    unet: torch.nn.Module = component(description="the denoiser; latents are made on its device, in its dtype")

    def check(self, inputs: Inputs) -> None:
        check_size(vae_scale_factor(self.vae), height=known(inputs, "height"), width=known(inputs, "width"))
        check_generator(known(inputs, "generator"), placement(self.unet)[0])
        check_batch(inputs)
        check_call_size(self.vae, inputs, self.unet, default=self.default_size() if self.has_default_size() else None)
        check_plain_unet(self.unet, self.vae)

    def has_default_size(self) -> bool:
        """Whether the UNet declares the ``sample_size`` that :meth:`default_size` reads."""
        return isinstance(getattr(getattr(self.unet, "params", None), "sample_size", None), int)

    def default_size(self) -> tuple[int, int]:
        """The model's native size: its ``sample_size`` in latents, times the VAE factor."""
        params = getattr(self.unet, "params", None)
        sample_size = getattr(params, "sample_size", None)
        if not isinstance(sample_size, int):
            raise ValueError(f"{type(self.unet).__name__} declares no sample_size: pass height= and width=")
        size = sample_size * vae_scale_factor(self.vae)
        return size, size

    def __call__(self, inputs: Inputs) -> Outputs:
        height, width = inputs.height, inputs.width
        if height is None or width is None:
            default_height, default_width = self.default_size()
            height, width = height or default_height, width or default_width
        device, dtype = placement(self.unet)
        factor = vae_scale_factor(self.vae)
        shape = (inputs.batch_size, self.vae.params.latent_channels, height // factor, width // factor)
        if inputs.latents is not None:
            if tuple(inputs.latents.shape) != shape:
                raise ValueError(f"latents have shape {tuple(inputs.latents.shape)}, expected {shape}")
            latents = inputs.latents.to(device=device, dtype=dtype)
        else:
            latents = self.noise(shape, inputs.generator, device=device, dtype=dtype)
        return self.Outputs(latents=latents * inputs.schedule.init_noise_sigma, height=height, width=width)

    def noise(
        self, shape: tuple[int, ...], generator: Generator | None, *, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """The starting noise, unit Gaussian as diffusers draws it (so a seed gives diffusers' image).

        Override it to start from other noise (offset or pyramid noise, a shared seed per batch);
        the scheduler's initial sigma is applied after.
        """
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


class PrepareImageLatents(Block):
    """Encode the input image and noise it to the first timestep of the (shortened) schedule."""

    class Inputs(BlockIO):
        image: ImageLike = Field(description="the image to start from")
        height: int | None = Field(None, description="resize the image to this height (default: its own, snapped)")
        width: int | None = Field(None, description="resize the image to this width (default: its own, snapped)")
        batch_size: int
        generator: Generator | None = None
        schedule: SchedulerState = produced(description="the scheduler's state for this run")
        prompt: Prompt | None = Field(None, description=PROMPT_FOR_CHECKS)
        num_images_per_prompt: int = Field(1, ge=1, le=64)

    class Outputs(BlockIO):
        latents: Float["batch channels height width"]
        image_latents: Float["batch channels height width"]
        noise: Float["batch channels height width"]
        height: int
        width: int

    vae: AutoencoderKL = component()
    scheduler: AbstractScheduler = component()
    unet: torch.nn.Module = component()

    def check(self, inputs: Inputs) -> None:
        check_size(vae_scale_factor(self.vae), height=known(inputs, "height"), width=known(inputs, "width"))
        check_generator(known(inputs, "generator"), placement(self.unet)[0])
        check_plain_unet(self.unet, self.vae)
        check_image(known(inputs, "image"))
        check_batch(inputs)
        check_call_size(self.vae, inputs, self.unet)

    def __call__(self, inputs: Inputs) -> Outputs:
        device, dtype = placement(self.unet)
        height, width = snap_size(*image_size(inputs.image), vae_scale_factor(self.vae))
        height, width = inputs.height or height, inputs.width or width
        pixels = normalize(to_tensor(inputs.image, height=height, width=width)).to(device=device, dtype=dtype)
        image_latents = encode_latents(self.vae, pixels, inputs.generator).to(dtype)
        image_latents = repeat_images(image_latents, inputs.batch_size)
        noise = randn_tensor(tuple(image_latents.shape), generator=inputs.generator, device=device, dtype=dtype)
        latents = self.scheduler.add_noise(inputs.schedule, image_latents, noise, 0)
        return self.Outputs(latents=latents, image_latents=image_latents, noise=noise, height=height, width=width)


def repeat_images(latents: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Repeat each image's latents for its prompt's images: image ``i`` goes with prompt ``i``."""
    if latents.shape[0] == batch_size:
        return latents
    if batch_size % latents.shape[0]:
        raise ValueError(f"cannot repeat {latents.shape[0]} images to a batch of {batch_size}; pass one image per prompt")
    return latents.repeat_interleave(batch_size // latents.shape[0], dim=0)
