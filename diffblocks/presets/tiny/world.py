"""The tiny procedural world: sample scenes from a seed, render them, and stream captioned batches.

Everything is numpy + PIL and a pure function of the seed, so a training run and its evaluation can
regenerate any sample anywhere, offline, with nothing downloaded.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from diffblocks.presets.tiny.captions import caption, choose
from diffblocks.presets.tiny.scene import Background, ObjectSpec, PromptSpec, Scene, SceneObject
from diffblocks.presets.tiny.shapes import shape_mask
from diffblocks.presets.tiny.vocabulary import (
    ANCHORS,
    BACKGROUND_COLOURS,
    BACKGROUNDS,
    COLOURS,
    COLUMNS,
    MARGIN,
    MIN_GAP,
    PALETTE,
    POSITION_JITTER,
    RELATIONS,
    ROWS,
    SHAPES,
    SIZE_EXTENT,
    SIZE_JITTER,
    SIZES,
    BackgroundColour,
)

DEFAULT_SIZE = 64
_PALETTE_RGB = {name: np.asarray(rgb, dtype=np.float32) for name, rgb in PALETTE.items()}
# Largest cross-axis offset between the two objects of a pair: small next to the main-axis
# separation (>= 17/64), so 'above' never looks like 'left of'.
_PAIR_WOBBLE = 3 / 64


@lru_cache(maxsize=64)
def _plain(colour: BackgroundColour, size: int) -> np.ndarray:
    """A read-only plain background; copying it is far cheaper than broadcasting a colour into RGB."""
    image = np.empty((size, size, 3), dtype=np.float32)
    image[...] = np.asarray(BACKGROUNDS[colour], dtype=np.float32)
    image.setflags(write=False)
    return image


def _random_spec(rng: np.random.Generator) -> PromptSpec:
    first = ObjectSpec(choose(rng, SHAPES), choose(rng, COLOURS))
    if rng.random() < 0.4:
        return PromptSpec((first,))
    while True:  # the two objects of a pair always differ in shape or colour
        second = ObjectSpec(choose(rng, SHAPES), choose(rng, COLOURS))
        if (second.shape, second.colour) != (first.shape, first.colour):
            return PromptSpec((first, second))


def _complete(spec: PromptSpec, rng: np.random.Generator) -> PromptSpec:
    """Fill every field the spec leaves free with a random choice."""
    objects = []
    for obj in spec.objects:
        size = obj.size or choose(rng, SIZES)
        position = obj.position
        if position is None and len(spec.objects) == 1:
            position = (choose(rng, ROWS), choose(rng, COLUMNS))
        objects.append(ObjectSpec(obj.shape, obj.colour, size, position))
    relation = spec.relation or (choose(rng, RELATIONS) if len(objects) == 2 else None)
    background = spec.background or choose(rng, BACKGROUND_COLOURS)
    return PromptSpec(tuple(objects), relation, background)


def _extent(obj: ObjectSpec, rng: np.random.Generator) -> float:
    assert obj.size is not None
    return SIZE_EXTENT[obj.size] + rng.uniform(-SIZE_JITTER[obj.size], SIZE_JITTER[obj.size])


def _clamp(value: float, extent: float) -> float:
    return min(max(value, MARGIN + extent / 2), 1.0 - MARGIN - extent / 2)


def _place_single(obj: ObjectSpec, rng: np.random.Generator) -> SceneObject:
    assert obj.size is not None and obj.position is not None
    extent = _extent(obj, rng)
    row, column = obj.position
    x = _clamp(ANCHORS[column] + rng.uniform(-POSITION_JITTER, POSITION_JITTER), extent)
    y = _clamp(ANCHORS[row] + rng.uniform(-POSITION_JITTER, POSITION_JITTER), extent)
    return SceneObject(obj.shape, obj.colour, obj.size, (x, y), extent, obj.position)


def _place_pair(spec: PromptSpec, rng: np.random.Generator) -> tuple[SceneObject, SceneObject]:
    """Place two objects so that ``objects[0]`` is ``relation`` ``objects[1]`` with a clear gap."""
    extents = [_extent(obj, rng) for obj in spec.objects]
    lead, trail = (0, 1) if spec.relation in ("above", "left of") else (1, 0)
    free = 1.0 - 2 * MARGIN - extents[0] - extents[1]  # >= MIN_GAP even for two large objects
    gap = rng.uniform(MIN_GAP, free)
    start = MARGIN + rng.uniform(0.0, free - gap)
    main = {lead: start + extents[lead] / 2, trail: start + extents[lead] + gap + extents[trail] / 2}
    widest = max(extents)
    base = rng.uniform(MARGIN + widest / 2, 1.0 - MARGIN - widest / 2)
    cross = [_clamp(base + rng.uniform(-_PAIR_WOBBLE, _PAIR_WOBBLE) / 2, e) for e in extents]
    vertical = spec.relation in ("above", "below")
    placed = []
    for i, obj in enumerate(spec.objects):
        assert obj.size is not None
        center = (cross[i], main[i]) if vertical else (main[i], cross[i])
        placed.append(SceneObject(obj.shape, obj.colour, obj.size, center, extents[i]))
    return placed[0], placed[1]


def _background(rng: np.random.Generator, colour: BackgroundColour) -> Background:
    style = rng.random()
    if style < 0.5:
        return Background(colour)
    if style < 0.8:
        angle, amplitude = rng.uniform(0, 2 * np.pi), rng.uniform(8.0, 24.0)
        gradient = (float(amplitude * np.cos(angle)), float(amplitude * np.sin(angle)))
        return Background(colour, "gradient", gradient=gradient)
    seed = int(rng.integers(2**31))
    return Background(colour, "noise", noise_std=float(rng.uniform(2.0, 5.0)), noise_seed=seed)


def sample_scene(rng: np.random.Generator, spec: PromptSpec | None = None) -> Scene:
    """Draw a random scene, or a random scene that satisfies ``spec`` (free fields drawn at random).

    Args:
        rng: the numpy generator every random choice comes from.
        spec: optional request, e.g. ``parse_prompt("a red circle above a blue square")``.
    """
    full = _complete(spec if spec is not None else _random_spec(rng), rng)
    assert full.background is not None
    background = _background(rng, full.background)
    if len(full.objects) == 1:
        return Scene((_place_single(full.objects[0], rng),), background)
    return Scene(_place_pair(full, rng), background, full.relation)


def render(scene: Scene, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Draw a scene as an anti-aliased RGB image.

    Args:
        scene: what to draw; its geometry is resolution-free.
        size: image side in pixels.

    Returns:
        uint8 array of shape (size, size, 3).
    """
    if size < 16:
        raise ValueError(f"image size {size} is below 16 px: small shapes would vanish")
    bg = scene.background
    image = _plain(bg.colour, size).copy()
    if bg.gradient != (0.0, 0.0):
        ramp = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        image += (bg.gradient[0] * ramp[None, :] + bg.gradient[1] * ramp[:, None])[:, :, None]
    if bg.noise_std > 0:
        # Grey (luminance) grain: one draw per pixel keeps the generator fast.
        grain = np.random.default_rng(bg.noise_seed).standard_normal((size, size, 1), dtype=np.float32)
        image += grain * np.float32(bg.noise_std)
    for obj in scene.objects:
        side = max(1, round(obj.extent * size))
        x0, y0 = round(obj.center[0] * size - side / 2), round(obj.center[1] * size - side / 2)
        mask = shape_mask(obj.shape, side, side)
        ys, xs = slice(max(y0, 0), min(y0 + side, size)), slice(max(x0, 0), min(x0 + side, size))
        alpha = mask[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0, None]
        image[ys, xs] += (_PALETTE_RGB[obj.colour] - image[ys, xs]) * alpha
    image += 0.5  # round half up on the cast below
    if bg.style != "plain":  # only gradients and grain can leave [0, 255]
        np.clip(image, 0.0, 255.0, out=image)
    return image.astype(np.uint8)


def make_batch(n: int, seed: int, *, start: int = 0, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, list[str]]:
    """Captioned training images; sample ``i`` depends only on ``(seed, start + i)``.

    Args:
        n: number of samples.
        seed: dataset seed (non-negative).
        start: index of the first sample, so shards and resumed runs see the same stream.
        size: image side in pixels.

    Returns:
        ``(images, captions)``: uint8 array (n, size, size, 3) and ``n`` caption strings.
    """
    if n < 0 or seed < 0 or start < 0:
        raise ValueError(f"n ({n}), seed ({seed}) and start ({start}) must be non-negative")
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions: list[str] = []
    for i in range(n):
        rng = np.random.default_rng((seed, start + i))
        scene = sample_scene(rng)
        images[i] = render(scene, size)
        captions.append(caption(scene, rng))
    return images, captions
