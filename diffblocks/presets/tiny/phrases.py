"""Phrase tables shared by the captioner and the prompt parser.

Captions are drawn from exactly these phrases and the parser matches exactly these phrases, so
every caption the world writes parses back (a round trip the tests run over thousands of scenes).
"""

from __future__ import annotations

from diffblocks.presets.tiny.vocabulary import BACKGROUND_COLOURS, COLOURS, SHAPES, Column, Relation, Row, Size

Position = tuple[Row, Column]

SIZE_WORDS: dict[Size, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
ARTICLES: tuple[str, ...] = ("a", "an", "the", "one")
PREFIXES: tuple[str, ...] = ("a picture of", "an image of", "a drawing of", "a photo of")
CONJUNCTION = "and"

_CORNER_WORDS: dict[Row, tuple[str, ...]] = {"top": ("top", "upper"), "bottom": ("bottom", "lower")}


def _corner_phrases(row: Row, column: Column) -> tuple[str, ...]:
    phrases: list[str] = []
    for word in _CORNER_WORDS[row]:
        phrases += [f"in the {word} {column} corner", f"in the {word} {column}", f"at the {word} {column}"]
    return tuple(phrases)


POSITION_PHRASES: dict[Position, tuple[str, ...]] = {
    ("middle", "center"): ("in the center", "in the middle", "at the center"),
    ("middle", "left"): ("on the left", "at the left", "on the left side"),
    ("middle", "right"): ("on the right", "at the right", "on the right side"),
    ("top", "center"): ("at the top", "near the top", "at the top center"),
    ("bottom", "center"): ("at the bottom", "near the bottom", "at the bottom center"),
    ("top", "left"): _corner_phrases("top", "left"),
    ("top", "right"): _corner_phrases("top", "right"),
    ("bottom", "left"): _corner_phrases("bottom", "left"),
    ("bottom", "right"): _corner_phrases("bottom", "right"),
}

RELATION_PHRASES: dict[Relation, tuple[str, ...]] = {
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
}
INVERSE_RELATION: dict[Relation, Relation] = {
    "above": "below",
    "below": "above",
    "left of": "right of",
    "right of": "left of",
}

BACKGROUND_TEMPLATES: tuple[str, ...] = ("on a {} background", "against a {} background", "with a {} background")


def vocabulary_text() -> str:
    """The whole vocabulary as one readable paragraph, for error messages and docs."""
    positions = sorted({phrase for phrases in POSITION_PHRASES.values() for phrase in phrases})
    relations = sorted({phrase for phrases in RELATION_PHRASES.values() for phrase in phrases})
    sizes = sorted(word for words in SIZE_WORDS.values() for word in words)
    return (
        f"shapes: {', '.join(SHAPES)}; colours: {', '.join(COLOURS)}; sizes: {', '.join(sizes)}; "
        f"positions: {', '.join(positions)}; relations: {', '.join(relations)}; "
        f"backgrounds: {', '.join(BACKGROUND_COLOURS)} (as 'on a white background')"
    )
