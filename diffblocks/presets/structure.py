"""Which preset a pipeline's blocks are: saved pipelines record their family, not their block code.

A saved folder names a family and its settings; loading rebuilds the family's blocks. So a pipeline
can be saved only when its block tree is exactly what its family builds, or the change (a replaced
block, a different block config) would be lost silently on loading.
"""

from __future__ import annotations

from typing import Any

from diffblocks.blocks import AbstractBlock, Block, Loop, Pipeline, Switch
from diffblocks.blocks.tree import walk
from diffblocks.blocks.pipeline import PresetInfo
from diffblocks.presets.families import FAMILIES

Row = tuple[str, str, str, Any]
"""One node of a block tree: its path, its class, its name, and what configures it."""

_MSG_DIFFERENT = (
    "pipeline {name!r} cannot be saved as the {family!r} preset: {detail}. A saved pipeline records its "
    "family and settings, not its blocks, so this change would be lost when it is loaded. Components, the "
    "guider and the scheduler may be swapped freely; keep the preset's blocks to save."
)
_MSG_UNKNOWN = (
    "pipeline {name!r} was not built by Pipeline.from_pretrained and its blocks are not those of any preset "
    "({families}) with default settings. Build it with preset=PresetInfo(family=..., settings=...) to say "
    "which preset it is."
)


def preset_of(pipe: Pipeline) -> PresetInfo:
    """The pipeline's preset, recognised from its blocks when it was built by hand, and checked against them.

    Raises:
        ValueError: no single family builds these blocks, or the blocks differ from the family's.
    """
    info = pipe.preset
    if info is None:
        matches = [family for family in FAMILIES.values() if tree_rows(family.build({})) == tree_rows(pipe.blocks)]
        if len(matches) != 1:
            raise ValueError(_MSG_UNKNOWN.format(name=pipe.name, families=", ".join(FAMILIES)))
        return PresetInfo(matches[0].name)
    if info.family not in FAMILIES:
        raise ValueError(f"pipeline {pipe.name!r} names family {info.family!r}; known families: {', '.join(FAMILIES)}")
    detail = first_difference(tree_rows(FAMILIES[info.family].build(info.settings)), tree_rows(pipe.blocks))
    if detail is not None:
        raise ValueError(_MSG_DIFFERENT.format(name=pipe.name, family=info.family, detail=detail))
    return info


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


__all__ = ["first_difference", "preset_of", "tree_rows"]
