"""Images in and out of the latent world: conversion, resizing, normalisation, masks, output types."""

from __future__ import annotations

from typing import Literal, Union

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from diffblocks.blocks.errors import FieldError

ImageLike = Union[PIL.Image.Image, np.ndarray, Tensor, list[PIL.Image.Image]]
"""A PIL image or a list of them, a ``(batch, height, width, channels)`` / ``(height, width, channels)``
array, or a ``(batch, channels, height, width)`` tensor. Values are read by their type: 8-bit images
and ``uint8`` arrays and tensors span [0, 255], 16-bit ones (PIL ``I;16`` and ``I``, ``uint16``
arrays and tensors) [0, 65535]; float images, arrays and tensors must lie in [0, 1] and are refused otherwise."""

_HIGH_DEPTH = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}
_INTEGER_RANGE = {torch.uint8: 255.0, torch.uint16: 65535.0}  # the integer tensors read as images, by their range
_UNIT_SLACK = 1e-3  # float images a hair outside [0, 1] (resampling overshoot) are clamped, not refused
_MSG_RANGE = (
    "{name} is a float {kind} with values in [{low:.4g}, {high:.4g}], but float images must lie in [0, 1]{hint}"
)


def image_range_problem(image: object, *, name: str = "image") -> str | None:
    """Why ``image``'s values cannot be read as an image (a float outside [0, 1], an integer type of unknown range), or None.

    Scaling by guess would turn a [0, 255] float image into a white one and a [-1, 1] one into a
    dark one without a word, so both are refused with the conversion to make.
    """
    items = image if isinstance(image, list) else [image]
    for item in items:
        if isinstance(item, PIL.Image.Image):
            if item.mode == "I" or item.mode == "F":
                array = np.asarray(item, dtype=np.float64)
                low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
                limit = _HIGH_DEPTH[item.mode]
                if low < -_UNIT_SLACK * limit or high > limit * (1 + _UNIT_SLACK):
                    what = "[0, 65535] (16 bits)" if item.mode == "I" else "[0, 1]"
                    return f"{name} is a PIL {item.mode!r} image with values in [{low:.4g}, {high:.4g}]; this mode is read as {what}"
            continue
        if isinstance(item, (np.ndarray, Tensor)):
            kind = "array" if isinstance(item, np.ndarray) else "tensor"
            dtype = str(item.dtype).replace("torch.", "")
            if dtype in ("uint8", "uint16", "bool"):
                continue
            if not (item.dtype.kind == "f" if isinstance(item, np.ndarray) else item.is_floating_point()):
                return f"{name} is a {dtype} {kind}, whose range is not known; give uint8 values in [0, 255] or floats in [0, 1]"
            if item.numel() if isinstance(item, Tensor) else item.size:
                low, high = float(item.min()), float(item.max())
                if not (np.isfinite(low) and np.isfinite(high)):
                    return f"{name} holds NaN or infinite values; give finite values in [0, 1]"
                if low < -_UNIT_SLACK or high > 1 + _UNIT_SLACK:
                    if low < 0:
                        hint = " (it looks like [-1, 1]: pass (x + 1) / 2)"
                    elif high <= 255:
                        hint = " (it looks like [0, 255]: pass x / 255, or uint8 values)"
                    else:
                        hint = ": rescale it to [0, 1]"
                    return _MSG_RANGE.format(name=name, kind=kind, low=low, high=high, hint=hint)
    return None

OutputType = Literal["pil", "np", "pt", "latent"]


def image_size(image: ImageLike) -> tuple[int, int]:
    """``(height, width)`` of an image input."""
    if isinstance(image, list):
        image = image[0]
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    return (int(image.shape[0]), int(image.shape[1])) if image.ndim == 3 else (int(image.shape[1]), int(image.shape[2]))


def check_image(image: object, *, name: str = "image") -> None:
    """Refuse, naming ``name``, an image whose values cannot be read as an image (see :func:`image_range_problem`)."""
    problem = image_range_problem(image, name=name)
    if problem is not None:
        raise FieldError(name, problem)


def snap_size(height: int, width: int, factor: int) -> tuple[int, int]:
    """Round a size down to multiples of ``factor`` (what the VAE needs)."""
    return height - height % factor, width - width % factor


def to_tensor(image: ImageLike, *, height: int, width: int, mode: Literal["RGB", "L"] = "RGB") -> Tensor:
    """A ``(batch, channels, height, width)`` float tensor in [0, 1], resized to ``height`` x ``width``.

    Raises:
        ValueError: when the values cannot be read as an image (see :func:`image_range_problem`).
    """
    problem = image_range_problem(image)
    if problem is not None:
        raise ValueError(problem)
    if isinstance(image, (PIL.Image.Image, list)):
        images = image if isinstance(image, list) else [image]
        arrays = [_pil_array(item, height=height, width=width, mode=mode) for item in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if isinstance(image, np.ndarray):
        array = image[None] if image.ndim == 3 else image
        scale = {"uint8": 255.0, "uint16": 65535.0}.get(str(array.dtype), 1.0)
        image = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32) / np.float32(scale)).permute(0, 3, 1, 2)
    elif image.dtype in _INTEGER_RANGE:
        image = image.float() / _INTEGER_RANGE[image.dtype]
    tensor = image[None] if image.ndim == 3 else image
    if tuple(tensor.shape[-2:]) != (height, width):
        tensor = torch.nn.functional.interpolate(tensor.float(), size=(height, width), mode="bilinear", antialias=True)
    return tensor.float()


def _pil_array(item: PIL.Image.Image, *, height: int, width: int, mode: Literal["RGB", "L"]) -> np.ndarray:
    """One PIL image as a ``(height, width, channels)`` float32 array in [0, 1]."""
    if item.mode in _HIGH_DEPTH:
        # PIL's own conversion of 16-bit and float images to RGB clips them to 8 bits (65535 -> 255, 0.5 -> 0):
        # scale to [0, 1] first and resample in float, then spread the one channel over RGB
        scaled = np.asarray(item, dtype=np.float32) / np.float32(_HIGH_DEPTH[item.mode])
        float_image = PIL.Image.fromarray(scaled)  # float32 -> mode "F"
        if float_image.size != (width, height):
            float_image = float_image.resize((width, height), resample=PIL.Image.Resampling.LANCZOS)
        array = np.clip(np.asarray(float_image, dtype=np.float32), 0.0, 1.0)[..., None]
        return np.repeat(array, 3, axis=-1) if mode == "RGB" else array
    item = item.convert(mode)
    if item.size != (width, height):
        item = item.resize((width, height), resample=PIL.Image.Resampling.LANCZOS)
    array = np.asarray(item, dtype=np.float32) / 255.0
    return array[..., None] if array.ndim == 2 else array


def normalize(image: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1], the range the VAE encodes."""
    return image * 2.0 - 1.0


def binarize_mask(mask: Tensor) -> Tensor:
    """Masks are 1 where the image is repainted and 0 where it is kept."""
    return (mask >= 0.5).to(mask.dtype)


def postprocess(images: Tensor, output_type: OutputType) -> list[PIL.Image.Image] | np.ndarray | Tensor:
    """Decoded images in [-1, 1] to the requested output type (values in [0, 1] for "np" and "pt")."""
    images = (images / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.detach().cpu().permute(0, 2, 3, 1).float().numpy()  # pipe(grad=True) decodes with autograd on
    if output_type == "np":
        return array
    pixels = (array * 255).round().astype("uint8")
    if pixels.shape[-1] == 1:
        return [PIL.Image.fromarray(p.squeeze(-1), mode="L") for p in pixels]
    return [PIL.Image.fromarray(p) for p in pixels]
