"""Flux ControlNet on a Flux pipeline: the blocks that add it to every workflow."""

from __future__ import annotations

from diffblocks.blocks import AbstractBlock, Loop
from diffblocks.blocks.flux import (
    PredictControlledFlow,
    PredictFlow,
    PrepareFluxControlImage,
    PrepareFluxImageLatents,
    PrepareFluxLatents,
)
from diffblocks.blocks.tree import inserted, replaced, walk

_MSG_NO_SITE = (
    "{name!r} has no workflow with a PredictFlow step in a loop and a PrepareFluxLatents or PrepareFluxImageLatents "
    "step: Flux ControlNet blocks are added to the Flux workflows"
)


def flux_controlnet_blocks(root: AbstractBlock) -> AbstractBlock:
    """A new tree where every Flux workflow runs a Flux ControlNet.

    :class:`PrepareFluxControlImage` is inserted before each step that makes the starting latents
    (:class:`PrepareFluxLatents`, :class:`PrepareFluxImageLatents`): it draws its VAE sample from
    the call's generator before the starting noise is drawn, as diffusers does, and in img2img it
    reads the size the image gave. The loop's :class:`PredictFlow` becomes :class:`PredictControlledFlow`.

    Raises:
        ValueError: the tree has no such workflow.
    """
    latents = [n.path for n in walk(root) if isinstance(n.block, (PrepareFluxLatents, PrepareFluxImageLatents))]
    predicts = [
        n.path for n in walk(root)
        if isinstance(n.block, PredictFlow) and n.parent is not None and isinstance(n.parent.block, Loop)
    ]  # fmt: skip
    if not latents or not predicts:
        raise ValueError(_MSG_NO_SITE.format(name=root.name))
    for path in predicts:
        root = replaced(root, path, PredictControlledFlow(name=path.rsplit(".", 1)[-1]))
    for path in latents:
        root = inserted(root, PrepareFluxControlImage(name="prepare_control_image"), before=path)
    return root


__all__ = ["flux_controlnet_blocks"]
