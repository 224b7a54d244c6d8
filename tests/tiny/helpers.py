"""Shared helpers for the tiny-world tests: degradations, perturbations, spec implication."""

from __future__ import annotations

from dataclasses import replace
from itertools import permutations

import numpy as np
from PIL import Image, ImageFilter

from diffblocks.presets.tiny import BACKGROUND_COLOURS, COLOURS, RELATIONS, SHAPES, PromptSpec, Scene, scene_spec
from diffblocks.presets.tiny.phrases import POSITION_PHRASES
from diffblocks.presets.tiny.scene import ObjectSpec


def degrade(image: np.ndarray, *, blur: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur (std ``blur`` px) then Gaussian pixel noise (std ``noise`` RGB units)."""
    pil = Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur)) if blur else Image.fromarray(image)
    noisy = np.asarray(pil, dtype=np.float32) + rng.normal(0.0, noise, image.shape)
    return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)


def _object_ok(want: ObjectSpec, got: ObjectSpec) -> bool:
    return (
        (want.shape, want.colour) == (got.shape, got.colour)
        and want.size in (None, got.size)
        and want.position in (None, got.position)
    )


def satisfies(scene: Scene, want: PromptSpec) -> bool:
    """Whether the scene's full spec meets every field ``want`` specifies."""
    full, want = scene_spec(scene).canonical(), want.canonical()
    if len(full.objects) != len(want.objects) or want.background not in (None, full.background):
        return False
    for order in permutations(full.objects):
        same_order = order == full.objects
        if all(_object_ok(w, g) for w, g in zip(want.objects, order)):
            if want.relation is None or (same_order and want.relation == full.relation):
                return True
    return False


def _other(rng: np.random.Generator, options: tuple[str, ...], old: object) -> str:
    choices = [o for o in options if o != old]
    return choices[int(rng.integers(len(choices)))]


def perturb(scene: Scene, asked: PromptSpec, rng: np.random.Generator) -> tuple[str, PromptSpec]:
    """A full spec that differs from ``scene`` in one attribute ``asked`` specifies, and its name."""
    full = scene_spec(scene)
    objects = list(full.objects)
    fields: list[str] = ["count", "colour", "shape"]
    fields += ["size"] * any(o.size for o in asked.objects) + ["relation"] * (asked.relation is not None)
    fields += ["position"] * (asked.objects[0].position is not None) + ["background"] * (asked.background is not None)
    field = fields[int(rng.integers(len(fields)))]
    i = int(rng.integers(len(objects)))
    if field == "size":  # only an object whose size the prompt names
        named = {(o.shape, o.colour) for o in asked.objects if o.size}
        i = next(k for k, o in enumerate(objects) if (o.shape, o.colour) in named)
    taken = {(o.shape, o.colour) for o in objects}
    obj = objects[i]
    if field == "colour":
        colours = tuple(c for c in COLOURS if (obj.shape, c) not in taken)
        objects[i] = replace(obj, colour=_other(rng, colours, obj.colour))
    elif field == "shape":
        shapes = tuple(s for s in SHAPES if (s, obj.colour) not in taken)
        objects[i] = replace(obj, shape=_other(rng, shapes, obj.shape))
    elif field == "size":
        objects[i] = replace(obj, size="small" if obj.size == "large" else "large")
    elif field == "position":
        cells = tuple(POSITION_PHRASES)
        objects[0] = replace(obj, position=cells[int(rng.integers(len(cells)))])
        while objects[0].position == obj.position:
            objects[0] = replace(obj, position=cells[int(rng.integers(len(cells)))])
    elif field == "relation":
        return field, replace(full, relation=_other(rng, RELATIONS, full.relation))
    elif field == "background":
        return field, replace(full, background=_other(rng, BACKGROUND_COLOURS, full.background))
    elif len(objects) == 2:  # count: drop one of the pair
        return field, PromptSpec((replace(objects[i], position=None),), None, full.background)
    else:  # count: add a second object
        extra = ObjectSpec(_other(rng, SHAPES, obj.shape), _other(rng, COLOURS, obj.colour))
        return field, PromptSpec((replace(obj, position=None), extra), None, full.background)
    return field, replace(full, objects=tuple(objects))
