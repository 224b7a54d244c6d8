"""The tiny world's vocabulary: shapes, named colours, sizes, positions, relations, backgrounds.

Every other module of the tiny world (sampler, renderer, captions, prompt parser, checker) reads its
words and numbers from here, so the world, its captions and its evaluation can never disagree.
The phrases that express them in English live in ``phrases``.
"""

from __future__ import annotations

from typing import Literal

Shape = Literal["circle", "square", "triangle", "cross", "ring"]
Colour = Literal["red", "orange", "yellow", "green", "cyan", "blue", "purple"]
BackgroundColour = Literal["white", "gray", "black", "beige"]
Size = Literal["small", "large"]
Row = Literal["top", "middle", "bottom"]
Column = Literal["left", "center", "right"]
Relation = Literal["above", "below", "left of", "right of"]

SHAPES: tuple[Shape, ...] = ("circle", "square", "triangle", "cross", "ring")
SIZES: tuple[Size, ...] = ("small", "large")
ROWS: tuple[Row, ...] = ("top", "middle", "bottom")
COLUMNS: tuple[Column, ...] = ("left", "center", "right")
RELATIONS: tuple[Relation, ...] = ("above", "below", "left of", "right of")

# Object colours sit at least ~95 RGB units from each other and from every background, and no
# object colour lies near the blend of another object colour with a background, so blurred edges
# never read as a third colour.
PALETTE: dict[Colour, tuple[int, int, int]] = {
    "red": (215, 30, 45),
    "orange": (245, 125, 10),
    "yellow": (240, 220, 30),
    "green": (40, 165, 70),
    "cyan": (40, 195, 215),
    "blue": (40, 80, 220),
    "purple": (140, 55, 190),
}
BACKGROUNDS: dict[BackgroundColour, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "beige": (225, 210, 175),
}
COLOURS: tuple[Colour, ...] = tuple(PALETTE)
BACKGROUND_COLOURS: tuple[BackgroundColour, ...] = tuple(BACKGROUNDS)

# Geometry, as fractions of the image side (64 px at the default resolution): object side lengths
# (base +- jitter), the anchor of each row/column for single objects, and how far a position may
# wander from its anchor. The checker's thresholds sit halfway between these values.
SIZE_EXTENT: dict[Size, float] = {"small": 14 / 64, "large": 26 / 64}
SIZE_JITTER: dict[Size, float] = {"small": 1 / 64, "large": 1 / 64}
LARGE_THRESHOLD = 20 / 64
ANCHORS: dict[str, float] = {"top": 0.25, "middle": 0.5, "bottom": 0.75, "left": 0.25, "center": 0.5, "right": 0.75}
POSITION_JITTER = 2 / 64
MARGIN = 2 / 64
MIN_GAP = 4 / 64
# Bounding-box centres further than this from the image centre (per axis) leave the middle band.
BAND_HALF_WIDTH = 0.125

