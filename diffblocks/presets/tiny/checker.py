"""Deterministic prompt-adherence checker for tiny-world images.

``check(image, prompt)`` parses the prompt, finds the objects in the image (``detect``), pairs
each requested object with a detected one (trying every pairing and keeping the one that meets
the most criteria), and reports one boolean per criterion: object count, each object's colour,
shape and, when asked, size and position, the pair's relation, and the background.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import permutations
from typing import TypeVar

import numpy as np
from PIL import Image

from diffblocks.presets.tiny.detect import Detection, detect
from diffblocks.presets.tiny.parse import parse_prompt
from diffblocks.presets.tiny.phrases import Position
from diffblocks.presets.tiny.scene import ObjectSpec, PromptSpec
from diffblocks.presets.tiny.vocabulary import BAND_HALF_WIDTH, COLUMNS, ROWS, BackgroundColour, Relation

T = TypeVar("T")


@dataclass(frozen=True)
class CheckResult:
    """Per-criterion verdicts for one image against one prompt (criteria keep their order)."""

    prompt: str
    spec: PromptSpec
    criteria: dict[str, bool]
    detections: tuple[Detection, ...]
    background: BackgroundColour

    @property
    def passed(self) -> bool:
        return all(self.criteria.values())

    def failures(self) -> list[str]:
        """Names of the criteria the image fails, e.g. ['object 2 shape', 'relation']."""
        return [name for name, ok in self.criteria.items() if not ok]


def _band(value: float, names: tuple[T, ...]) -> T:
    return names[0] if value < 0.5 - BAND_HALF_WIDTH else names[2] if value > 0.5 + BAND_HALF_WIDTH else names[1]


def located(detection: Detection) -> Position:
    """The (row, column) cell of the 3 x 3 grid a detection's box centre falls in."""
    x, y = detection.center
    return _band(y, ROWS), _band(x, COLUMNS)


def relation_holds(a: Detection, b: Detection, relation: Relation) -> bool:
    """Whether ``a`` is ``relation`` ``b``: the offset's dominant axis and its sign must agree."""
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    if relation == "above":
        return dy > abs(dx)
    if relation == "below":
        return -dy > abs(dx)
    if relation == "left of":
        return dx > abs(dy)
    return -dx > abs(dy)


def _object_criteria(index: int, want: ObjectSpec, got: Detection | None) -> dict[str, bool]:
    name = f"object {index + 1}"
    verdicts = {
        f"{name} colour": got is not None and got.colour == want.colour,
        f"{name} shape": got is not None and got.shape == want.shape,
    }
    if want.size is not None:
        verdicts[f"{name} size"] = got is not None and got.size == want.size
    if want.position is not None:
        verdicts[f"{name} position"] = got is not None and located(got) == want.position
    return verdicts


def _criteria(spec: PromptSpec, pairing: Sequence[Detection | None], n_found: int, bg: str) -> dict[str, bool]:
    verdicts = {"count": n_found == len(spec.objects)}
    for i, (want, got) in enumerate(zip(spec.objects, pairing)):
        verdicts |= _object_criteria(i, want, got)
    if spec.relation is not None:
        a, b = pairing
        verdicts["relation"] = a is not None and b is not None and relation_holds(a, b, spec.relation)
    if spec.background is not None:
        verdicts["background"] = bg == spec.background
    return verdicts


def check(image: Image.Image | np.ndarray, prompt: str) -> CheckResult:
    """Does ``image`` show what ``prompt`` asks?

    Args:
        image: PIL image, or (H, W, 3) array (uint8, or float in [0, 1]); resized to 64 x 64.
        prompt: a tiny-world prompt (``ValueError`` outside the world's vocabulary).
    """
    spec = parse_prompt(prompt)
    detections, background = detect(image)
    candidates: list[Detection | None] = [*detections, *([None] * len(spec.objects))]
    best: dict[str, bool] | None = None
    for pairing in permutations(candidates, len(spec.objects)):
        verdicts = _criteria(spec, pairing, len(detections), background)
        if best is None or sum(verdicts.values()) > sum(best.values()):
            best = verdicts
    assert best is not None
    return CheckResult(prompt, spec, best, detections, background)


def adherence(images: Sequence[Image.Image | np.ndarray] | np.ndarray, prompts: Sequence[str]) -> float:
    """Fraction of ``images[i]`` that pass ``check(images[i], prompts[i])``, e.g. over ``EVAL_PROMPTS``.

    Args:
        images: one image per prompt (a sequence, or an array of shape (N, H, W, 3)).
        prompts: the prompts the images were generated from.
    """
    if len(images) != len(prompts) or len(prompts) == 0:
        raise ValueError(f"need one image per prompt and at least one: {len(images)} images, {len(prompts)} prompts")
    return sum(check(image, prompt).passed for image, prompt in zip(images, prompts)) / len(prompts)
