"""Layouts and their parts: where each model's weights sit in a single-file checkpoint, and how to tell."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from diffblocks.components.models.single_file.rules import Table

Shapes = Mapping[str, tuple[int, ...]]
"""Every key of a file and its tensor's shape (read from the header, without the tensors)."""

_MSG_NO_LAYOUT = (
    "{file}: its keys fit no known layout for {what}. The closest is {closest}, but the file lacks "
    "{missing}. Known layouts: {known}. Is it a LoRA, an embedding, or a model of another family?"
)


@dataclass(frozen=True)
class Part:
    """One model's weights in a single file.

    Attributes:
        component: its name in a pipeline (``"unet"``, ``"vae"``, ``"text_encoder"``, ...).
        class_name: the diffusers or transformers class the weights load into.
        prefixes: its keys start with one of these (tried in order; ``""`` for a file of this model alone).
        signature: keys, after the prefix, that every file holding this part has.
        table: our key -> the rule that makes it from the file (see :mod:`.rules`).
        infer: the model's diffusers config from the part's shapes (keys without the prefix);
            None when the config must come from a folder or Hub id.
    """

    component: str
    class_name: str
    prefixes: tuple[str, ...]
    signature: tuple[str, ...]
    table: Table
    infer: Callable[[Shapes], dict[str, Any]] | None = None

    def prefix_in(self, shapes: Shapes) -> str | None:
        """The first prefix under which every signature key is in ``shapes``; None if there is none."""
        for prefix in self.prefixes:
            if all(prefix + key in shapes for key in self.signature):
                return prefix
        return None

    def missing(self, shapes: Shapes) -> list[str]:
        """The signature keys absent under the prefix that comes closest."""
        gaps = [[prefix + key for key in self.signature if prefix + key not in shapes] for prefix in self.prefixes]
        return min(gaps, key=len)

    def shapes(self, shapes: Shapes, prefix: str) -> dict[str, tuple[int, ...]]:
        """This part's keys and shapes, the prefix removed."""
        return {key[len(prefix) :]: shape for key, shape in shapes.items() if key.startswith(prefix)}


@dataclass(frozen=True)
class Layout:
    """A family of single-file checkpoints: the parts its files may hold."""

    name: str
    title: str
    parts: tuple[Part, ...]

    def part(self, component: str) -> Part:
        return next(part for part in self.parts if part.component == component)


def find_part(shapes: Shapes, class_name: str, layouts: tuple[Layout, ...], *, file: str) -> tuple[Part, str]:
    """The part of ``shapes`` that loads into ``class_name``, and its prefix.

    Raises:
        ValueError: no part for the class fits the keys; names the closest and what it lacks.
    """
    candidates = [(layout, part) for layout in layouts for part in layout.parts if part.class_name == class_name]
    for _, part in candidates:
        prefix = part.prefix_in(shapes)
        if prefix is not None:
            return part, prefix
    raise no_layout_error(shapes, candidates, what=class_name, file=file, layouts=layouts)


def no_layout_error(
    shapes: Shapes, candidates: list[tuple[Layout, Part]], *, what: str, file: str, layouts: tuple[Layout, ...]
) -> ValueError:
    """The error for a file that fits none of ``candidates``: the closest one and what it lacks."""
    if not candidates:
        return ValueError(f"no single-file layout holds a {what}; known layouts: {_known(layouts)}")
    layout, part = min(candidates, key=lambda c: len(c[1].missing(shapes)) / len(c[1].signature))
    missing = part.missing(shapes)
    shown = ", ".join(missing[:5]) + (f" ... ({len(missing)} keys)" if len(missing) > 5 else "")
    closest = f"the {layout.title} {part.component} ({part.class_name}, keys under {part.prefixes[0]!r})"
    return ValueError(_MSG_NO_LAYOUT.format(file=file, what=what, closest=closest, missing=shown, known=_known(layouts)))


def _known(layouts: tuple[Layout, ...]) -> str:
    return "; ".join(f"{layout.name} ({layout.title})" for layout in layouts)


__all__ = ["Layout", "Part", "Shapes", "find_part", "no_layout_error"]
