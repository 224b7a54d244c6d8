"""Bounds on the size of one call, checked in the blocks' ``check`` before anything is allocated.

A size or a batch beyond these fails only after minutes of work, or takes the machine's memory
with it, so it is refused up front with the estimate that broke the bound:

- a side of at most :data:`MAX_SIDE` pixels;
- a starting latent tensor (the whole batch) of at most :data:`MAX_LATENT_ELEMENTS` elements,
  the most a tensor may hold for PyTorch's kernels that index with 32-bit integers;
- no single activation above :data:`MAX_TENSOR_BYTES`. Two are estimated, for the whole batch:
  the VAE decoder's widest channels at full resolution, and the denoiser's first activation for
  the two guidance passes. Beyond it, no single accelerator holds the tensor and its neighbours.
"""

from __future__ import annotations

import torch

from diffblocks.blocks.errors import FieldError
from diffblocks.components.models.autoencoder_kl import AutoencoderKL

MAX_SIDE = 16384
"""Largest height or width in pixels (16 times SDXL's training size)."""

MAX_LATENT_ELEMENTS = 2**31 - 1
"""Largest starting latent tensor, batch included: the int32 indexing limit of many PyTorch kernels."""

MAX_TENSOR_BYTES = 32 * 2**30
"""Largest single activation a call may need (32 GiB; the models hold several such tensors at once)."""

_GUIDANCE_PASSES = 2  # classifier-free guidance runs the denoiser on a doubled batch


def _gib(count: float) -> str:
    return f"{count / 2**30:.1f} GiB"


def check_run_size(
    vae: AutoencoderKL,
    *,
    height: int | None,
    width: int | None,
    batch: int | None = None,
    denoiser: tuple[int, torch.dtype] | None = None,
) -> None:
    """Refuse a size (and batch) whose tensors would exceed the bounds above, naming the estimate.

    Args:
        vae: the autoencoder: its downsampling factor, latent and decoder channels, and dtype.
        height: image height in pixels (None: not known before the run; only the other side is checked).
        width: image width in pixels.
        batch: images made in the call (None: not known yet; one image is checked).
        denoiser: channels per latent cell of the denoiser's first activation, and its dtype.

    Raises:
        FieldError: on ``height``/``width`` for a side or an image too large, on
            ``num_images_per_prompt`` for a batch too large at a size that fits alone.
    """
    for name, value in (("height", height), ("width", width)):
        if value is not None and value > MAX_SIDE:
            raise FieldError(name, f"{name} {value} is larger than {MAX_SIDE} pixels, the most a call may ask for")
    if height is None or width is None:
        return
    params, images = vae.params, batch or 1
    cells = (height // params.downscale) * (width // params.downscale)
    latents = images * params.latent_channels * cells
    if latents > MAX_LATENT_ELEMENTS:
        raise FieldError(
            "num_images_per_prompt" if images > 1 else "height",
            f"{images} image(s) of {height}x{width} need a latent tensor of {latents:,} elements, more than "
            f"{MAX_LATENT_ELEMENTS:,} (PyTorch's 32-bit index limit); make fewer images per call or smaller ones",
        )
    estimates = {"the VAE decoder": _decoder_bytes(vae, height * width)}
    if denoiser is not None:
        channels, dtype = denoiser
        estimates["the denoiser"] = _GUIDANCE_PASSES * channels * cells * dtype.itemsize
    what, per_image = max(estimates.items(), key=lambda item: item[1])
    if images * per_image <= MAX_TENSOR_BYTES:
        return
    if per_image <= MAX_TENSOR_BYTES:
        most = MAX_TENSOR_BYTES // per_image
        raise FieldError(
            "num_images_per_prompt",
            f"{images} images of {height}x{width} need {_gib(images * per_image)} in one activation of {what}, more than "
            f"{_gib(MAX_TENSOR_BYTES)}; make at most {most} images of this size per call",
        )
    side = int((MAX_TENSOR_BYTES / per_image * height * width) ** 0.5) // params.downscale * params.downscale
    raise FieldError(
        "height",
        f"an image of {height}x{width} needs {_gib(per_image)} in one activation of {what}, more than "
        f"{_gib(MAX_TENSOR_BYTES)}; use at most about {side}x{side} pixels (and upscale after)",
    )


def _decoder_bytes(vae: AutoencoderKL, pixels: int) -> int:
    """Bytes of the decoder's widest activation at full resolution for one image."""
    widest = max(vae.params.block_out_channels[:2])  # the last upsampling's output and the last level
    dtype = next(vae.parameters()).dtype
    size = 4 if dtype == torch.float16 and vae.force_upcast else dtype.itemsize  # such a VAE decodes in float32
    return widest * pixels * size


__all__ = ["MAX_LATENT_ELEMENTS", "MAX_SIDE", "MAX_TENSOR_BYTES", "check_run_size"]
