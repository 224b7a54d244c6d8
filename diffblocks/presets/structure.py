"""Which preset a pipeline's blocks come from, and whether they are still exactly the preset's.

A saved folder names a family and its settings. When the pipeline's tree is exactly what the
family builds, that is all it records, and loading rebuilds the family's blocks (so a fix to the
family reaches old saves). When the tree was edited (a block inserted, replaced, removed or
configured otherwise), the tree itself is saved too (:mod:`diffblocks.presets.treefile`).
"""

from __future__ import annotations

from typing import Any

from diffblocks.blocks import AbstractBlock, Block, Loop, Pipeline, Switch
from diffblocks.blocks.tree import walk
from diffblocks.blocks.pipeline import PresetInfo
from diffblocks.presets.families import FAMILIES

Row = tuple[str, str, str, Any]
"""One node of a block tree: its path, its class, its name, and what configures it."""

_MSG_UNKNOWN = (
    "pipeline {name!r} was not built by Pipeline.from_pretrained and its blocks are not those of any preset "
    "({families}) with default settings. Build it with preset=PresetInfo(family=..., settings=...) to say "
    "which preset it starts from; its own blocks are saved with it."
)


def preset_of(pipe: Pipeline) -> PresetInfo:
    """The pipeline's preset, recognised from its blocks when it was built by hand.

    Raises:
        ValueError: the pipeline names no preset and no single family builds these blocks, or it
            names an unknown family.
    """
    info = pipe.preset
    if info is None:
        matches = [family for family in FAMILIES.values() if tree_rows(family.build({})) == tree_rows(pipe.blocks)]
        if len(matches) != 1:
            raise ValueError(_MSG_UNKNOWN.format(name=pipe.name, families=", ".join(FAMILIES)))
        return PresetInfo(matches[0].name)
    if info.family not in FAMILIES:
        raise ValueError(f"pipeline {pipe.name!r} names family {info.family!r}; known families: {', '.join(FAMILIES)}")
    return info


def edited(pipe: Pipeline, preset: PresetInfo) -> str | None:
    """How the pipeline's tree differs from what its family builds with its settings, in words; None if it does not."""
    return first_difference(tree_rows(FAMILIES[preset.family].build(preset.settings)), tree_rows(pipe.blocks))


def tree_rows(block: AbstractBlock) -> list[Row]:
    """Every node of a block tree, depth first, as ``(path, class, name, configuration)``.

    Paths are those of :meth:`Pipeline.replace_block` (``"workflow.text2img.denoise.step"``).
    """
    return [_row(node.label, node.block) for node in walk(block)]


def _row(label: str, block: AbstractBlock) -> Row:
    if isinstance(block, Switch):
        return (label, "Switch", block.name, tuple((b.name, b.when) for b in block.branches))
    if isinstance(block, Loop):
        return (label, _class_name(block), block.name, (block.over, block.item, block.index, block.count))
    config = block.config.model_dump() if isinstance(block, Block) else None
    return (label, _class_name(block), block.name, config)


def first_difference(expected: list[Row], actual: list[Row]) -> str | None:
    """The first place two trees differ, in words; None when they are the same."""
    for (path, cls, name, config), (got_path, got_cls, got_name, got_config) in zip(expected, actual):
        if path != got_path:
            return f"the preset has block {path!r} where this pipeline has {got_path!r}"
        if cls != got_cls:
            return f"block {path!r} is a {got_cls} where the preset has a {cls}"
        if name != got_name:
            return f"block {path!r} is named {got_name!r} where the preset's is named {name!r}"
        if config != got_config:
            return f"block {path!r} is configured {got_config} where the preset has {config}"
    if len(expected) > len(actual):
        return f"block {expected[len(actual)][0]!r} of the preset is missing"
    if len(actual) > len(expected):
        return f"block {actual[len(expected)][0]!r} is not part of the preset"
    return None


def _class_name(block: AbstractBlock) -> str:
    cls = type(block)
    return f"{cls.__module__}.{cls.__qualname__}"


__all__ = ["edited", "first_difference", "preset_of", "tree_rows"]
