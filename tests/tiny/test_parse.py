"""Captions and the prompt parser: round trip, phrase coverage, vocabulary errors."""

from __future__ import annotations

import numpy as np
import pytest

from diffblocks.presets.tiny import ObjectSpec, PromptSpec, caption, parse_prompt, sample_scene
from diffblocks.presets.tiny.phrases import BACKGROUND_TEMPLATES, POSITION_PHRASES, RELATION_PHRASES

from .helpers import satisfies


def test_every_caption_parses_back_to_a_spec_its_scene_satisfies() -> None:
    rng = np.random.default_rng(2024)
    seen: set[str] = set()
    for _ in range(4000):
        scene = sample_scene(rng)
        text = caption(scene, rng)
        seen.add(text)
        assert satisfies(scene, parse_prompt(text)), text
    assert len(seen) > 3500  # templates and attributes vary enough that captions rarely repeat


def test_examples_read_as_expected() -> None:
    assert parse_prompt("a red circle above a blue square") == PromptSpec(
        (ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), "above"
    )
    assert parse_prompt("a blue square below a red circle").canonical() == parse_prompt(
        "a red circle above a blue square"
    )
    assert parse_prompt("Red circle on the left.") == PromptSpec((ObjectSpec("circle", "red", None, ("middle", "left")),))
    assert parse_prompt("a small green triangle in the top right corner on a white background") == PromptSpec(
        (ObjectSpec("triangle", "green", "small", ("top", "right")),), None, "white"
    )
    assert parse_prompt("in the lower left, one big purple ring") == PromptSpec(
        (ObjectSpec("ring", "purple", "large", ("bottom", "left")),)
    )
    assert parse_prompt("a picture of a cyan cross and an orange square").relation is None


def test_every_phrase_in_the_tables_parses() -> None:
    for position, phrases in POSITION_PHRASES.items():
        for phrase in phrases:
            assert parse_prompt(f"a red circle {phrase}").objects[0].position == position
    for relation, phrases in RELATION_PHRASES.items():
        for phrase in phrases:
            assert parse_prompt(f"a red circle {phrase} a blue ring").relation == relation
    for template in BACKGROUND_TEMPLATES:
        assert parse_prompt(f"a red circle {template.format('beige')}").background == "beige"


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a red hexagon", "unknown word 'hexagon'"),
        ("a magenta circle", "unknown word 'magenta'"),
        ("a white circle", "'white' is a background colour"),
        ("a red", "expected a shape after 'red'"),
        ("a big circle", "expected a colour after 'a big'"),
        ("", "it names 0 objects"),
        ("a red circle, a blue square and a green ring", "it names 3 objects"),
        ("a red circle above", "a relation needs two objects"),
        ("a red circle above a blue square on the left", "no absolute position"),
        ("a red circle on the left at the top", "2 position phrases"),
        ("a red circle a picture of", "expected a colour after 'a', got 'picture'"),
    ],
)
def test_prompts_outside_the_world_fail_and_list_the_vocabulary(prompt: str, message: str) -> None:
    with pytest.raises(ValueError, match="shapes: circle, square, triangle, cross, ring") as info:
        parse_prompt(prompt)
    assert message in str(info.value)
