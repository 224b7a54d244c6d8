"""Captions for tiny-world scenes, varied in template so that prompts compose.

A caption always names every object's colour and shape; it may leave out sizes, a single object's
position, the pair's relation ('A and B') and the background, and it may state a relation either
way round ('A above B' or 'B below A'). The model thus learns each attribute on its own, and any
prompt the parser accepts is a caption the world could have written.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

from diffblocks.presets.tiny.phrases import (
    BACKGROUND_TEMPLATES,
    CONJUNCTION,
    INVERSE_RELATION,
    POSITION_PHRASES,
    PREFIXES,
    RELATION_PHRASES,
    SIZE_WORDS,
)
from diffblocks.presets.tiny.scene import Scene, SceneObject

T = TypeVar("T")

# How often a caption carries each optional part (tuned so every part is common but not constant).
P_PREFIX = 0.15
P_SIZE = 0.5
P_POSITION = 0.85
P_POSITION_FIRST = 0.2
P_NO_RELATION = 0.1
P_BACKGROUND = 0.35
P_NO_ARTICLE = 0.15


def choose(rng: np.random.Generator, options: tuple[T, ...]) -> T:
    """One of ``options``, uniformly (indexing keeps the element's own type, unlike ``rng.choice``)."""
    return options[int(rng.random() * len(options))]


def _indefinite(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(obj: SceneObject, rng: np.random.Generator, *, bare_allowed: bool) -> str:
    words = [obj.colour, obj.shape]
    if rng.random() < P_SIZE:
        words.insert(0, choose(rng, SIZE_WORDS[obj.size]))
    if bare_allowed and rng.random() < P_NO_ARTICLE:
        return " ".join(words)
    roll = rng.random()
    article = _indefinite(words[0]) if roll < 0.7 else "the" if roll < 0.9 else "one"
    return " ".join([article, *words])


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random caption that ``scene`` satisfies, e.g. 'a small red circle above a blue square'.

    Args:
        scene: the scene to describe.
        rng: the numpy generator every wording choice comes from.
    """
    prefix = choose(rng, PREFIXES) if rng.random() < P_PREFIX else ""
    bare_allowed = not prefix
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        text = _object_phrase(obj, rng, bare_allowed=bare_allowed)
        if obj.position is not None and rng.random() < P_POSITION:
            where = choose(rng, POSITION_PHRASES[obj.position])
            text = f"{where}, {text}" if not prefix and rng.random() < P_POSITION_FIRST else f"{text} {where}"
    else:
        first, second = scene.objects
        assert scene.relation is not None
        relation = scene.relation
        if rng.random() < 0.5:  # state the relation the other way round
            first, second, relation = second, first, INVERSE_RELATION[relation]
        a = _object_phrase(first, rng, bare_allowed=bare_allowed)
        b = _object_phrase(second, rng, bare_allowed=bare_allowed)
        link = CONJUNCTION if rng.random() < P_NO_RELATION else choose(rng, RELATION_PHRASES[relation])
        text = f"{a} {link} {b}"
    if rng.random() < P_BACKGROUND:
        text = f"{text} {choose(rng, BACKGROUND_TEMPLATES).format(scene.background.colour)}"
    return f"{prefix} {text}" if prefix else text
