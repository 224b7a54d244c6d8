"""Inpainting masks in: PIL images, arrays or tensors to one binary ``(batch, 1, height, width)`` tensor.

Masks are 1 where the image is repainted and 0 where it is kept. They are read the way diffusers'
inpainting pipelines read them, so the same mask gives the same pixels: a PIL mask is resized with
Lanczos in its own mode and then made grayscale; arrays and tensors are resized with nearest
neighbours; every value at or above 0.5 becomes 1.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from diffblocks.blocks.standard.images import _HIGH_DEPTH, _INTEGER_RANGE, _pil_array, image_range_problem, image_size

MaskLike = Union[PIL.Image.Image, list[PIL.Image.Image], np.ndarray, Tensor]
"""A PIL image (any mode) or a list of them; an array ``(height, width)``, ``(height, width, 1)``,
``(batch, height, width)`` or ``(batch, height, width, 1)``; or a tensor ``(height, width)``,
``(batch, height, width)`` or ``(batch, 1, height, width)``. Values in [0, 1] (``uint8`` in [0, 255]),
read by type as images are (:data:`~diffblocks.blocks.standard.images.ImageLike`)."""


def mask_size(mask: MaskLike) -> tuple[int, int]:
    """``(height, width)`` of a mask input, before any resizing."""
    if not isinstance(mask, np.ndarray):
        return image_size(mask)  # PIL images and tensors are sized as images are; arrays have mask layouts
    if mask.ndim == 2 or (mask.ndim == 3 and mask.shape[-1] == 1):
        return int(mask.shape[0]), int(mask.shape[1])
    return int(mask.shape[1]), int(mask.shape[2])


def check_mask_shape(mask: MaskLike) -> None:
    """Raise a ValueError that names the accepted layouts when a mask's rank or channels are wrong."""
    if isinstance(mask, list):
        if not mask or not all(isinstance(m, PIL.Image.Image) for m in mask):
            raise ValueError("a mask list must hold one or more PIL images")
        return
    problem = image_range_problem(mask, name="mask_image")
    if problem is not None:
        raise ValueError(problem)
    if isinstance(mask, PIL.Image.Image):
        return
    shape = tuple(mask.shape)
    if isinstance(mask, Tensor):
        ok = len(shape) in (2, 3) or (len(shape) == 4 and shape[1] == 1)
        layouts = "(height, width), (batch, height, width) or (batch, 1, height, width)"
    else:
        ok = len(shape) in (2, 3) or (len(shape) == 4 and shape[-1] == 1)
        layouts = "(height, width), (height, width, 1), (batch, height, width) or (batch, height, width, 1)"
    if not ok:
        raise ValueError(f"mask_image has shape {shape}; a mask {type(mask).__name__} must be {layouts}")


def mask_to_tensor(mask: MaskLike, *, height: int, width: int) -> Tensor:
    """A binary float32 ``(batch, 1, height, width)`` mask resized to ``height`` x ``width``."""
    if isinstance(mask, (PIL.Image.Image, list)):
        images = mask if isinstance(mask, list) else [mask]
        arrays = []
        for item in images:
            if item.mode in _HIGH_DEPTH:  # 16-bit and float images: PIL's convert("L") would clip them to 8 bits
                arrays.append(_pil_array(item, height=height, width=width, mode="L")[..., 0])
                continue
            if item.size != (width, height):
                item = item.resize((width, height), resample=PIL.Image.Resampling.LANCZOS)
            arrays.append(np.asarray(item.convert("L"), dtype=np.float32) / 255.0)
        tensor = torch.from_numpy(np.stack(arrays))[:, None]
    elif isinstance(mask, np.ndarray):
        array = np.asarray(mask, dtype=np.float32) / np.float32({"uint8": 255.0, "uint16": 65535.0}.get(str(mask.dtype), 1.0))
        if array.ndim == 2:
            array = array[None, :, :, None]
        elif array.ndim == 3:
            array = array[None] if array.shape[-1] == 1 else array[..., None]
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)
    else:
        tensor = mask.float() / _INTEGER_RANGE[mask.dtype] if mask.dtype in _INTEGER_RANGE else mask.float()
        if tensor.ndim == 2:
            tensor = tensor[None, None]
        elif tensor.ndim == 3:
            tensor = tensor[:, None]
    if tuple(tensor.shape[-2:]) != (height, width):
        tensor = torch.nn.functional.interpolate(tensor, size=(height, width), mode="nearest")
    return (tensor >= 0.5).to(torch.float32)


def latent_mask(mask: Tensor, *, factor: int) -> Tensor:
    """A pixel mask brought to the latent grid by nearest neighbours (what the denoiser sees)."""
    height, width = mask.shape[-2] // factor, mask.shape[-1] // factor
    return torch.nn.functional.interpolate(mask, size=(height, width), mode="nearest")


__all__ = ["MaskLike", "check_mask_shape", "latent_mask", "mask_size", "mask_to_tensor"]
