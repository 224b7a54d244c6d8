"""Value types of the tiny world: a rendered scene, and what a prompt asks for (its spec)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from diffblocks.presets.tiny.phrases import INVERSE_RELATION, Position
from diffblocks.presets.tiny.vocabulary import (
    BACKGROUNDS,
    COLUMNS,
    PALETTE,
    RELATIONS,
    ROWS,
    SHAPES,
    SIZES,
    BackgroundColour,
    Colour,
    Relation,
    Shape,
    Size,
)

BackgroundStyle = Literal["plain", "gradient", "noise"]


def _check_object(shape: str, colour: str, size: str | None, position: Position | None) -> None:
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r} is not one of {SHAPES}")
    if colour not in PALETTE:
        raise ValueError(f"colour {colour!r} is not one of {tuple(PALETTE)}")
    if size is not None and size not in SIZES:
        raise ValueError(f"size {size!r} is not one of {SIZES}")
    if position is not None and (position[0] not in ROWS or position[1] not in COLUMNS):
        raise ValueError(f"position {position!r} is not a (row, column) pair from {ROWS} x {COLUMNS}")


def _check_pair(n_objects: int, relation: str | None, *, relation_required: bool) -> None:
    if n_objects not in (1, 2):
        raise ValueError(f"a tiny-world scene holds 1 or 2 objects, got {n_objects}")
    if relation is not None and relation not in RELATIONS:
        raise ValueError(f"relation {relation!r} is not one of {RELATIONS}")
    if n_objects == 1 and relation is not None:
        raise ValueError(f"relation {relation!r} needs two objects, got one")
    if n_objects == 2 and relation is None and relation_required:
        raise ValueError("a two-object scene needs the relation between its objects")


@dataclass(frozen=True, slots=True)
class SceneObject:
    """One drawn object: centre (x, y) and side length ``extent`` are fractions of the image side."""

    shape: Shape
    colour: Colour
    size: Size
    center: tuple[float, float]
    extent: float
    position: Position | None = None

    def __post_init__(self) -> None:
        _check_object(self.shape, self.colour, self.size, self.position)
        if not 0.0 < self.extent < 1.0:
            raise ValueError(f"extent {self.extent} must lie in (0, 1) (a fraction of the image side)")


@dataclass(frozen=True, slots=True)
class Background:
    """A plain colour, optionally with a linear gradient (RGB units across the image) or fine noise."""

    colour: BackgroundColour
    style: BackgroundStyle = "plain"
    gradient: tuple[float, float] = (0.0, 0.0)
    noise_std: float = 0.0
    noise_seed: int = 0

    def __post_init__(self) -> None:
        if self.colour not in BACKGROUNDS:
            raise ValueError(f"background {self.colour!r} is not one of {tuple(BACKGROUNDS)}")


@dataclass(frozen=True, slots=True)
class Scene:
    """One or two objects on a background; with two, ``objects[0]`` is ``relation`` ``objects[1]``."""

    objects: tuple[SceneObject, ...]
    background: Background
    relation: Relation | None = None

    def __post_init__(self) -> None:
        _check_pair(len(self.objects), self.relation, relation_required=True)


@dataclass(frozen=True, slots=True)
class ObjectSpec:
    """What a prompt asks of one object; ``None`` fields are left free."""

    shape: Shape
    colour: Colour
    size: Size | None = None
    position: Position | None = None

    def __post_init__(self) -> None:
        _check_object(self.shape, self.colour, self.size, self.position)


@dataclass(frozen=True, slots=True)
class PromptSpec:
    """What a prompt asks for: 1-2 objects, their relation (``objects[0]`` to ``objects[1]``), a background."""

    objects: tuple[ObjectSpec, ...]
    relation: Relation | None = None
    background: BackgroundColour | None = None

    def __post_init__(self) -> None:
        _check_pair(len(self.objects), self.relation, relation_required=False)
        if len(self.objects) == 2 and any(obj.position is not None for obj in self.objects):
            raise ValueError("absolute positions are for single objects; two objects take a relation")
        if self.background is not None and self.background not in BACKGROUNDS:
            raise ValueError(f"background {self.background!r} is not one of {tuple(BACKGROUNDS)}")

    def canonical(self) -> PromptSpec:
        """The same request with 'below'/'right of' rewritten as 'above'/'left of' by swapping objects."""
        if self.relation in ("below", "right of"):
            return PromptSpec(self.objects[::-1], INVERSE_RELATION[self.relation], self.background)
        return self


def scene_spec(scene: Scene) -> PromptSpec:
    """The most specific prompt spec a scene satisfies (every field filled in)."""
    objects = tuple(ObjectSpec(o.shape, o.colour, o.size, o.position) for o in scene.objects)
    return PromptSpec(objects, scene.relation, scene.background.colour)
