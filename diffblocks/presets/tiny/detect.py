"""Find the objects in a tiny-world image: background fit, palette segmentation, blobs, shapes.

Each pixel is explained as a blend of the local background and one palette colour, the same
linear mix anti-aliasing and blur produce. The colour whose blend explains the pixel best
(smallest residual) is its colour, and the pixel belongs to the object when it is at least half
that colour (alpha >= 0.5). So a blurred red edge on white
reads as half red, never as some pinker third colour, and a model's slightly-off red is still red.
Objects are then the 4-connected blobs of object pixels; a blob's shape is the world shape whose
mask, fitted to the blob's bounding box, overlaps it best (intersection over union).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image

from diffblocks.presets.tiny.shapes import shape_mask
from diffblocks.presets.tiny.vocabulary import (
    BACKGROUNDS,
    COLOURS,
    LARGE_THRESHOLD,
    PALETTE,
    SHAPES,
    BackgroundColour,
    Colour,
    Shape,
    Size,
)

ANALYSIS_SIZE = 64
# Blobs smaller than this (fraction of the image) are specks, not objects: the smallest world
# object covers ~2.3 % of a 64 x 64 image.
MIN_AREA = 24 / 64**2
# Below this intersection over union the blob matches no world shape.
MIN_SHAPE_IOU = 0.6
_MAX_BLOBS = 8
_PALETTE_RGB = np.asarray([PALETTE[c] for c in COLOURS], dtype=np.float32)  # (K, 3)
_BACKGROUND_RGB = np.asarray([BACKGROUNDS[b] for b in BACKGROUNDS], dtype=np.float32)


@dataclass(frozen=True, slots=True)
class Detection:
    """One object found in an image; centre and extent are fractions of the image side."""

    colour: Colour
    shape: Shape | None
    shape_iou: float
    size: Size
    center: tuple[float, float]
    extent: float
    area: float
    colour_purity: float


def as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An image as float32 RGB in [0, 255] at the analysis size (64 x 64), shape (64, 64, 3)."""
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB array, got shape {array.shape}")
        if array.dtype != np.uint8:  # floats are taken to be in [0, 1], as model outputs are
            array = np.clip(np.asarray(array, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        pil = Image.fromarray(array)
    if pil.size != (ANALYSIS_SIZE, ANALYSIS_SIZE):
        pil = pil.resize((ANALYSIS_SIZE, ANALYSIS_SIZE), Image.Resampling.BOX)
    return np.asarray(pil, dtype=np.float32)


def fit_background(image: np.ndarray) -> tuple[np.ndarray, BackgroundColour]:
    """Fit a linear colour ramp to the image's outer frame; return it per pixel and its colour name.

    Args:
        image: float RGB (S, S, 3).

    Returns:
        ``(background, name)``: float (S, S, 3) and the nearest background colour at the centre.
    """
    s = image.shape[0]
    grid = (np.arange(s, dtype=np.float32) + 0.5) / s - 0.5
    xs, ys = np.meshgrid(grid, grid)
    design = np.stack([np.ones_like(xs), xs, ys], axis=-1)  # (S, S, 3)
    frame = np.zeros((s, s), dtype=bool)
    frame[[0, -1], :] = frame[:, [0, -1]] = True
    a, b = design[frame], image[frame]
    keep = np.ones(len(a), dtype=bool)
    for _ in range(2):  # refit without frame pixels an object touches
        coef = np.linalg.lstsq(a[keep], b[keep], rcond=None)[0]
        residual = np.linalg.norm(b - a @ coef, axis=1)
        keep = residual <= max(3.0 * float(np.median(residual)), 12.0)
    background = design @ coef
    name = list(BACKGROUNDS)[int(np.argmin(np.linalg.norm(_BACKGROUND_RGB - coef[0], axis=1)))]
    return background, name


def label_pixels(image: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Palette index of every pixel, or -1 for background (see the module docstring).

    Args:
        image: float RGB (S, S, 3).
        background: float RGB (S, S, 3), e.g. from ``fit_background``.
    """
    # Channel-first planes keep every sum over RGB an add of three contiguous planes.
    towards = _PALETTE_RGB.T[:, :, None, None] - background.transpose(2, 0, 1)[:, None]  # (3, K, S, S)
    offset = (image - background).transpose(2, 0, 1)[:, None]  # (3, 1, S, S)
    length2 = np.maximum(_sum3(towards * towards), 1.0)  # (K, S, S)
    alpha = np.clip(_sum3(offset * towards) / length2, 0.0, 1.0)
    miss = offset - alpha * towards
    residual = np.sqrt(_sum3(miss * miss))
    # The colour whose blend explains the pixel best wins; the pixel is that colour's if it is at
    # least half of it and the blend is off by < 20 units plus a third of the colour's contrast.
    best = residual.argmin(0)[None]
    alpha, residual = np.take_along_axis(alpha, best, 0)[0], np.take_along_axis(residual, best, 0)[0]
    contrast = np.sqrt(np.take_along_axis(length2, best, 0)[0])
    return np.where((alpha >= 0.5) & (residual < 20.0 + contrast / 3.0), best[0], -1)


def _sum3(planes: np.ndarray) -> np.ndarray:
    return planes[0] + planes[1] + planes[2]


def connected_components(mask: np.ndarray) -> np.ndarray:
    """4-connected blob ids of a boolean mask (ids are arbitrary ints, -1 outside the mask)."""
    none = mask.size
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), none)
    while True:  # each pass spreads the smallest id one step; converges within a blob's diameter
        spread = labels.copy()
        np.minimum(spread[1:], labels[:-1], out=spread[1:])
        np.minimum(spread[:-1], labels[1:], out=spread[:-1])
        np.minimum(spread[:, 1:], labels[:, :-1], out=spread[:, 1:])
        np.minimum(spread[:, :-1], labels[:, 1:], out=spread[:, :-1])
        spread[~mask] = none
        if np.array_equal(spread, labels):
            return np.where(mask, labels, -1)
        labels = spread


def _trimmed(counts: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Candidate (start, stop) of a blob along one axis: the full span, and the span less up to two
    single-pixel lines at each end (the whiskers blur plus noise leave on straight edges)."""
    nonzero = np.flatnonzero(counts)
    lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
    los, his = [lo], [hi]
    while counts[los[-1]] <= 1 and len(los) < 3 and his[0] - los[-1] > 3:
        los.append(los[-1] + 1)
    while counts[his[-1] - 1] <= 1 and len(his) < 3 and his[-1] - los[0] > 3:
        his.append(his[-1] - 1)
    return tuple(los), tuple(his)


def classify_shape(blob: np.ndarray) -> tuple[Shape | None, float, tuple[int, int, int, int]]:
    """The world shape whose mask best overlaps a blob when fitted to one of the blob's candidate boxes.

    Args:
        blob: bool (S, S), true on the blob's pixels.

    Returns:
        ``(shape, iou, (y0, y1, x0, x1))``; shape is None when no IoU reaches ``MIN_SHAPE_IOU``.
    """
    (y0s, y1s), (x0s, x1s) = _trimmed(blob.sum(1)), _trimmed(blob.sum(0))
    area = int(blob.sum())
    best: tuple[Shape | None, float, tuple[int, int, int, int]] = (None, 0.0, (y0s[0], y1s[0], x0s[0], x1s[0]))
    for y0, y1, x0, x1 in product(y0s, y1s, x0s, x1s):
        inside = int(blob[y0:y1, x0:x1].sum())
        for shape in SHAPES:
            template = shape_mask(shape, x1 - x0, y1 - y0) >= 0.5
            overlap = int((blob[y0:y1, x0:x1] & template).sum())
            iou = overlap / (area - inside + int((blob[y0:y1, x0:x1] | template).sum()))
            if iou > best[1]:
                best = (shape, iou, (y0, y1, x0, x1))
    return best if best[1] >= MIN_SHAPE_IOU else (None, best[1], best[2])


def detect(image: Image.Image | np.ndarray) -> tuple[tuple[Detection, ...], BackgroundColour]:
    """Objects in ``image`` (largest first, at most 8) and its background colour name."""
    rgb = as_rgb_array(image)
    background, name = fit_background(rgb)
    labels = label_pixels(rgb, background)
    blobs = connected_components(labels >= 0)
    ids, areas = np.unique(blobs[blobs >= 0], return_counts=True)
    s = rgb.shape[0]
    found = []
    for blob_id, area in sorted(zip(ids.tolist(), areas.tolist()), key=lambda item: -item[1])[:_MAX_BLOBS]:
        if area < MIN_AREA * s * s:
            break
        where = blobs == blob_id
        votes = np.bincount(labels[where], minlength=len(COLOURS))
        shape, iou, (y0, y1, x0, x1) = classify_shape(where)
        extent = max(x1 - x0, y1 - y0) / s
        found.append(
            Detection(
                colour=COLOURS[int(votes.argmax())],
                shape=shape,
                shape_iou=iou,
                size="large" if extent >= LARGE_THRESHOLD else "small",
                center=((x0 + x1) / (2 * s), (y0 + y1) / (2 * s)),
                extent=extent,
                area=area / (s * s),
                colour_purity=float(votes.max() / area),
            )
        )
    return tuple(found), name
