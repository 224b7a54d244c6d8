"""Anti-aliased coverage masks of the tiny world's shapes, shared by the renderer and the checker.

Masks are drawn with PIL at 8x supersampling and box-filtered down, so edges carry fractional
coverage the way a real camera (or a VAE decoder) would produce them. They are cached per
(shape, width, height): rendering a scene is then array slicing and blending, which keeps the
training generator at thousands of images per second on one core.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from diffblocks.presets.tiny.vocabulary import Shape

_SUPERSAMPLE = 8
# Cross arm thickness and ring hole diameter, as fractions of the shape's side.
CROSS_ARM = 0.36
RING_HOLE = 0.5


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, w: float, h: float) -> None:
    # Coordinates are in supersampled pixels; PIL boxes include their far edge, hence the -1.
    x1, y1 = w - 1, h - 1
    if shape == "circle":
        draw.ellipse((0, 0, x1, y1), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, x1, y1), fill=255)
    elif shape == "triangle":
        draw.polygon([(w / 2, 0), (x1, y1), (0, y1)], fill=255)
    elif shape == "cross":
        aw, ah = w * CROSS_ARM, h * CROSS_ARM
        draw.rectangle(((w - aw) / 2, 0, (w + aw) / 2 - 1, y1), fill=255)
        draw.rectangle((0, (h - ah) / 2, x1, (h + ah) / 2 - 1), fill=255)
    elif shape == "ring":
        hw, hh = w * RING_HOLE / 2, h * RING_HOLE / 2
        draw.ellipse((0, 0, x1, y1), fill=255)
        draw.ellipse((w / 2 - hw, h / 2 - hh, w / 2 + hw - 1, h / 2 + hh - 1), fill=0)
    else:
        raise ValueError(f"no drawing rule for shape {shape!r}")


@lru_cache(maxsize=1024)
def shape_mask(shape: Shape, width: int, height: int) -> np.ndarray:
    """Coverage in [0, 1] of ``shape`` drawn to fill a ``width`` x ``height`` pixel box.

    Args:
        shape: a tiny-world shape name.
        width: box width in pixels (>= 1).
        height: box height in pixels (>= 1).

    Returns:
        A read-only float32 array of shape (height, width).
    """
    if width < 1 or height < 1:
        raise ValueError(f"mask box must be at least 1x1 pixels, got {width}x{height}")
    big = Image.new("L", (width * _SUPERSAMPLE, height * _SUPERSAMPLE), 0)
    _draw(ImageDraw.Draw(big), shape, float(width * _SUPERSAMPLE), float(height * _SUPERSAMPLE))
    small = big.resize((width, height), Image.Resampling.BOX)
    mask = np.asarray(small, dtype=np.float32) / 255.0
    mask.setflags(write=False)
    return mask
