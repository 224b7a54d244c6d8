"""Images in and out of the latent world: conversion, resizing, normalisation, masks, output types."""

from __future__ import annotations

from typing import Literal, Union

import numpy as np
import PIL.Image
import torch
from torch import Tensor

ImageLike = Union[PIL.Image.Image, np.ndarray, Tensor, list[PIL.Image.Image]]
"""A PIL image or a list of them, a ``(batch, height, width, channels)`` / ``(height, width, channels)``
array in [0, 1], or a ``(batch, channels, height, width)`` tensor in [0, 1]."""

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


def snap_size(height: int, width: int, factor: int) -> tuple[int, int]:
    """Round a size down to multiples of ``factor`` (what the VAE needs)."""
    return height - height % factor, width - width % factor


def to_tensor(image: ImageLike, *, height: int, width: int, mode: Literal["RGB", "L"] = "RGB") -> Tensor:
    """A ``(batch, channels, height, width)`` float tensor in [0, 1], resized to ``height`` x ``width``."""
    if isinstance(image, (PIL.Image.Image, list)):
        images = image if isinstance(image, list) else [image]
        arrays = []
        for item in images:
            item = item.convert(mode)
            if item.size != (width, height):
                item = item.resize((width, height), resample=PIL.Image.Resampling.LANCZOS)
            array = np.asarray(item, dtype=np.float32) / 255.0
            arrays.append(array[..., None] if array.ndim == 2 else array)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if isinstance(image, np.ndarray):
        array = image[None] if image.ndim == 3 else image
        image = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(0, 3, 1, 2)
    tensor = image[None] if image.ndim == 3 else image
    if tuple(tensor.shape[-2:]) != (height, width):
        tensor = torch.nn.functional.interpolate(tensor.float(), size=(height, width), mode="bilinear", antialias=True)
    return tensor.float()


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
