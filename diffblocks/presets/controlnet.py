"""ControlNet on a UNet pipeline: the blocks that add it to every workflow, and a loaded pipeline with one added."""

from __future__ import annotations

import collections.abc

from diffblocks.blocks import AbstractBlock, Loop, Pipeline, Sequence
from diffblocks.blocks.standard.controlnet import PredictControlledNoise, PrepareControlImage, controlnet_mismatch
from diffblocks.blocks.standard import PredictNoise
from diffblocks.blocks.tree import inserted, replaced, walk
from diffblocks.components.models.controlnet import ControlNetModel, MultiControlNetModel
from diffblocks.components.models.unet import UNet2DConditionModel

_MSG_NO_SITE = (
    "{name!r} has no workflow with a PredictNoise step in a loop and a prepare_guidance step before it: "
    "ControlNet blocks are added to the UNet families' workflows (SD 1.x/2.x, SDXL)"
)


def controlnet_blocks(root: AbstractBlock) -> AbstractBlock:
    """A new tree where every UNet workflow runs a ControlNet.

    In each workflow (a :class:`Sequence` holding ``prepare_guidance`` and a denoise :class:`Loop`),
    :class:`PrepareControlImage` is inserted before ``prepare_guidance`` (after the latents, whose
    size and batch it reads) and the loop's :class:`PredictNoise` becomes :class:`PredictControlledNoise`.

    Raises:
        ValueError: the tree has no such workflow.
    """
    sites: list[tuple[str, str]] = []
    for node in walk(root):
        if isinstance(node.block, PredictNoise) and node.parent is not None and isinstance(node.parent.block, Loop):
            workflow = node.parent.parent
            if workflow is not None and isinstance(workflow.block, Sequence) and "prepare_guidance" in workflow.block.child_names():
                sites.append((node.path, f"{workflow.path}.prepare_guidance" if workflow.path else "prepare_guidance"))
    if not sites:
        raise ValueError(_MSG_NO_SITE.format(name=root.name))
    for predict, guidance in sites:
        root = replaced(root, predict, PredictControlledNoise())
        root = inserted(root, PrepareControlImage(name="prepare_control_image"), before=guidance)
    return root


def with_controlnet(pipe: Pipeline, controlnet: ControlNetModel | collections.abc.Sequence[ControlNetModel]) -> Pipeline:
    """A new pipeline: ``pipe``'s blocks with ControlNet steps, its components and ``controlnet``.

    The call then takes ``control_image=`` (and ``controlnet_conditioning_scale``,
    ``control_guidance_start``, ``control_guidance_end``) in text2img, img2img and inpaint. ``pipe``
    is unchanged, and both share its components manager, so the base weights are held once.
    Several ControlNets (a sequence) act together as one :class:`MultiControlNetModel`; the call
    then takes a list of control images, one per net.

    Raises:
        ValueError: the ControlNet was made for another family or size than ``pipe``'s UNet
            (naming both), or ``pipe`` is not a UNet pipeline.
    """
    unet = pipe.components.get("unet")
    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(f"{pipe.name!r} has no UNet2DConditionModel 'unet' for a ControlNet to steer (got {type(unet).__name__})")
    nets = (controlnet,) if isinstance(controlnet, ControlNetModel) else tuple(controlnet)
    for net in nets:
        problem = controlnet_mismatch(net, unet)
        if problem is not None:
            raise ValueError(problem)
    component = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
    components = {**pipe.components, "controlnet": component}
    return Pipeline(controlnet_blocks(pipe.blocks), components, manager=pipe.manager, name=pipe.name)


__all__ = ["controlnet_blocks", "with_controlnet"]
