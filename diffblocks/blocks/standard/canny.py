"""Canny edges (Canny 1986, "A Computational Approach to Edge Detection") for a ControlNet's control image.

The edges are kornia's (``kornia.filters.canny``): kornia is pure PyTorch, so it needs no other
native library beside torch, and runs on the GPU as well. The thresholds are given on OpenCV's
scale, so the numbers of ``cv2.Canny(image, 100, 200)`` in ControlNet model cards mean the same
here: OpenCV compares the unnormalised 3x3 Sobel gradient of 0..255 pixels, kornia the same
gradient of 0..1 pixels, so the thresholds are divided by 255.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import torch

_MSG_KORNIA = "canny() needs kornia, which is not installed: pip install 'diffblocks[canny]' (or pip install kornia)"


def canny(image: PIL.Image.Image, low: float = 100, high: float = 200, *, sigma: float = 0.0) -> PIL.Image.Image:
    """The edges of ``image``: white, one pixel wide, on black, as an RGB picture of the same size.

    A pixel is an edge where the gradient of its grey value peaks across the edge (non-maximum
    suppression) and is above ``high``, or above ``low`` and connected to such a pixel (hysteresis).

    Args:
        image: any picture; it is read as RGB, then as its grey value (ITU-R 601 weights).
        low: the weak threshold, on OpenCV's scale (the Sobel gradient of 0..255 pixels).
        high: the strong threshold, on the same scale; ``100, 200`` as in ControlNet model cards.
        sigma: the standard deviation in pixels of a Gaussian blur before the gradient, which
            keeps texture and noise out of the edges (0: no blur, as ``cv2.Canny``).

    Raises:
        TypeError: ``image`` is not a PIL image.
        ValueError: a threshold is negative, ``low > high``, or ``sigma`` is negative.
        ModuleNotFoundError: kornia is not installed (the ``canny`` extra).

    Example:
        >>> square = PIL.Image.new("RGB", (32, 32))
        >>> square.paste((255, 255, 255), (8, 8, 24, 24))
        >>> edges = canny(square)
        >>> edges.size, edges.mode, np.asarray(edges)[16, :, 0].nonzero()[0].tolist()
        ((32, 32), 'RGB', [7, 23])
    """
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"canny() takes a PIL image, got {type(image).__name__}: use PIL.Image.fromarray for an array")
    if low < 0 or high < 0 or low > high:
        raise ValueError(f"canny() needs 0 <= low <= high (on OpenCV's 0..255 gradient scale), got low={low}, high={high}")
    if sigma < 0 or not math.isfinite(sigma):
        raise ValueError(f"canny() needs sigma >= 0 (pixels of blur; 0 for none), got {sigma}")
    try:
        import kornia
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(_MSG_KORNIA) from err
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    size = 2 * math.ceil(3 * sigma) + 1 if sigma > 0 else 1  # kernel_size 1: kornia skips the blur
    _, edges = kornia.filters.canny(pixels, low / 255.0, high / 255.0, kernel_size=size, sigma=(sigma or 1.0, sigma or 1.0))
    grey = (edges[0, 0] * 255).to(torch.uint8).numpy()
    return PIL.Image.fromarray(np.stack([grey] * 3, axis=-1))  # uint8 (h, w, 3): RGB


__all__ = ["canny"]
