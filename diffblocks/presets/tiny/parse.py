"""Read a prompt back into what it asks of the tiny world (a ``PromptSpec``).

The parser matches the same phrase tables the captioner writes from (longest phrase first), reads
objects as ``[article] [size] colour shape``, and then checks the sentence's structure. Words
outside the world and structures it cannot draw fail with a ``ValueError`` that lists the vocabulary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, cast

from diffblocks.presets.tiny.phrases import (
    ARTICLES,
    BACKGROUND_TEMPLATES,
    CONJUNCTION,
    POSITION_PHRASES,
    PREFIXES,
    RELATION_PHRASES,
    SIZE_WORDS,
    Position,
    vocabulary_text,
)
from diffblocks.presets.tiny.scene import ObjectSpec, PromptSpec
from diffblocks.presets.tiny.vocabulary import (
    BACKGROUNDS,
    PALETTE,
    SHAPES,
    BackgroundColour,
    Colour,
    Relation,
    Shape,
)

Kind = Literal["prefix", "position", "relation", "background", "and", "object"]
_SIZE_OF_WORD = {word: size for size, words in SIZE_WORDS.items() for word in words}
_MSG_VOCABULARY = "The tiny world understands {vocabulary}."


@dataclass(frozen=True, slots=True)
class _Element:
    kind: Kind
    value: object
    word_index: int


@lru_cache(maxsize=1)
def _lexicon() -> tuple[tuple[tuple[str, ...], Kind, object], ...]:
    """Every fixed phrase as (words, kind, value), longest first so 'on the left of' beats 'on the left'."""
    entries: list[tuple[tuple[str, ...], Kind, object]] = [(tuple(p.split()), "prefix", None) for p in PREFIXES]
    entries += [(tuple(p.split()), "position", pos) for pos, ps in POSITION_PHRASES.items() for p in ps]
    entries += [(tuple(p.split()), "relation", rel) for rel, ps in RELATION_PHRASES.items() for p in ps]
    entries += [(tuple(t.format(bg).split()), "background", bg) for t in BACKGROUND_TEMPLATES for bg in BACKGROUNDS]
    entries.append(((CONJUNCTION,), "and", None))
    return tuple(sorted(entries, key=lambda entry: -len(entry[0])))


def _known_words() -> set[str]:
    words = set(ARTICLES) | set(_SIZE_OF_WORD) | set(PALETTE) | set(SHAPES)
    return words | {word for phrase, _, _ in _lexicon() for word in phrase}


def _fail(prompt: str, problem: str) -> ValueError:
    return ValueError(f"cannot read prompt {prompt!r}: {problem}. " + _MSG_VOCABULARY.format(vocabulary=vocabulary_text()))


def _at(words: list[str], j: int) -> str:
    return repr(words[j]) if j < len(words) else "the end of the prompt"


def _read_object(words: list[str], i: int, prompt: str) -> tuple[ObjectSpec, int] | None:
    """Read ``[article] [size] colour shape`` at word ``i``; None when no object starts there."""
    j = i + (words[i] in ARTICLES)
    size = _SIZE_OF_WORD.get(words[j]) if j < len(words) else None
    j += size is not None
    colour = words[j] if j < len(words) else ""
    if j == i and colour not in PALETTE and colour not in BACKGROUNDS:
        return None
    if colour in BACKGROUNDS:
        raise _fail(prompt, f"{colour!r} is a background colour; objects are {', '.join(PALETTE)}")
    if colour not in PALETTE:
        raise _fail(prompt, f"expected a colour after {' '.join(words[i:j])!r}, got {_at(words, j)}")
    if j + 1 >= len(words) or words[j + 1] not in SHAPES:
        raise _fail(prompt, f"expected a shape after {colour!r}, got {_at(words, j + 1)}")
    return ObjectSpec(cast(Shape, words[j + 1]), cast(Colour, colour), size), j + 2


def _tokens(prompt: str) -> list[str]:
    return re.sub(r"[,.;:!?\-]", " ", prompt.lower()).split()


def _elements(prompt: str) -> list[_Element]:
    words, known, i = _tokens(prompt), _known_words(), 0
    unknown = [w for w in words if w not in known]
    if unknown:
        raise _fail(prompt, f"unknown word{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}")
    found: list[_Element] = []
    while i < len(words):
        match = next((e for e in _lexicon() if tuple(words[i : i + len(e[0])]) == e[0]), None)
        if match is not None and (match[1] != "prefix" or i == 0):
            found.append(_Element(match[1], match[2], i))
            i += len(match[0])
            continue
        read = _read_object(words, i, prompt)
        if read is None:
            raise _fail(prompt, f"unexpected {words[i]!r} at word {i + 1}")
        found.append(_Element("object", read[0], i))
        i = read[1]
    return found


def parse_prompt(prompt: str) -> PromptSpec:
    """What ``prompt`` asks of the tiny world.

    Args:
        prompt: a caption-like sentence, e.g. 'a red circle above a blue square'.

    Example:
        >>> spec = parse_prompt("a small green triangle in the top right corner on a white background")
        >>> spec.objects[0].position, spec.background
        (('top', 'right'), 'white')
    """
    elements = [e for e in _elements(prompt) if e.kind != "prefix"]
    kinds = [e.kind for e in elements]
    objects = [cast(ObjectSpec, e.value) for e in elements if e.kind == "object"]
    if not 1 <= len(objects) <= 2:
        raise _fail(prompt, f"it names {len(objects)} objects; scenes hold 1 or 2")
    for kind in ("position", "relation", "background", "and"):
        if kinds.count(kind) > 1:
            raise _fail(prompt, f"it has {kinds.count(kind)} {kind} phrases; at most one is allowed")
    background = next((cast(BackgroundColour, e.value) for e in elements if e.kind == "background"), None)
    rest = [e for e in elements if e.kind != "background"]
    if len(objects) == 1:
        if any(e.kind in ("relation", "and") for e in rest):
            raise _fail(prompt, "a relation needs two objects")
        position = next((cast(Position, e.value) for e in rest if e.kind == "position"), None)
        obj = objects[0]
        return PromptSpec((ObjectSpec(obj.shape, obj.colour, obj.size, position),), None, background)
    if [e.kind for e in rest] not in (["object", "relation", "object"], ["object", "and", "object"]):
        raise _fail(prompt, "two objects read as 'A <relation> B' or 'A and B', with no absolute position")
    relation = cast(Relation, rest[1].value) if rest[1].kind == "relation" else None
    return PromptSpec(tuple(objects), relation, background)
