"""ControlNet on a UNet pipeline: the blocks that add it to every workflow, and a loaded pipeline with one added."""

from __future__ import annotations

import collections.abc
from collections.abc import Callable
from typing import Any

from diffblocks.blocks import AbstractBlock, Loop, Pipeline, Sequence
from diffblocks.blocks.pipeline import PresetInfo
from diffblocks.blocks.flux import flux_controlnet_mismatch
from diffblocks.blocks.flux.controlnet import flux_family_name
from diffblocks.blocks.standard.controlnet import PredictControlledNoise, PrepareControlImage, controlnet_mismatch, family_name
from diffblocks.blocks.standard import PredictNoise
from diffblocks.blocks.tree import inserted, replaced, walk
from diffblocks.components.models.controlnet import (
    ControlNetModel,
    ControlNetUnionModel,
    FluxControlNetModel,
    FluxMultiControlNetModel,
    MultiControlNetModel,
    MultiControlNetUnionModel,
)
from diffblocks.components.models.flux import FluxTransformer2DModel
from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.presets import flux, sd15, sdxl
from diffblocks.presets.families import Family
from diffblocks.presets.flux_controlnet import flux_controlnet_blocks

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


_MSG_OTHER_FAMILY = (
    "the ControlNet ({controlnet}) does not fit the {model} ({family}): a {kind} steers {steers} only; "
    "load a ControlNet made for this pipeline's base model"
)

AnyControlNet = ControlNetModel | ControlNetUnionModel | FluxControlNetModel


def with_controlnet(pipe: Pipeline, controlnet: AnyControlNet | collections.abc.Sequence[AnyControlNet]) -> Pipeline:
    """A new pipeline: ``pipe``'s blocks with ControlNet steps, its components and ``controlnet``.

    The call then takes ``control_image=`` (and ``controlnet_conditioning_scale``,
    ``control_guidance_start``, ``control_guidance_end``) in text2img, img2img and inpaint. ``pipe``
    is unchanged, and both share its components manager, so the base weights are held once.
    Several ControlNets (a sequence) act together as one :class:`MultiControlNetModel`; the call
    then takes a list of control images, one per net.

    An SDXL :class:`ControlNetUnionModel` alone reads one control image per ``control_mode``; beside
    other nets (unions or plain ControlNets) they act as one :class:`MultiControlNetUnionModel`, and
    ``control_mode`` has one entry per net (None for a plain one). A Flux pipeline takes :class:`FluxControlNetModel` s (several act as one
    :class:`FluxMultiControlNetModel`), and the call also ``control_mode=`` for a ControlNet-Union.

    Raises:
        ValueError: the ControlNet was made for another family or size than ``pipe``'s UNet or
            transformer (naming both), or ``pipe`` is neither a UNet nor a Flux pipeline.
    """
    nets = (controlnet,) if isinstance(controlnet, (ControlNetModel, ControlNetUnionModel, FluxControlNetModel)) else tuple(controlnet)
    transformer = pipe.components.get("transformer")
    if isinstance(transformer, FluxTransformer2DModel):
        return _with_flux_controlnet(pipe, transformer, nets)
    unet = pipe.components.get("unet")
    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(f"{pipe.name!r} has no UNet2DConditionModel 'unet' for a ControlNet to steer (got {type(unet).__name__})")
    for net in nets:
        if isinstance(net, FluxControlNetModel):
            raise ValueError(_MSG_OTHER_FAMILY.format(controlnet=flux_family_name(net.params), model="UNet",
                family=family_name(unet.params), kind="Flux ControlNet", steers="a Flux transformer"))  # fmt: skip
        problem = controlnet_mismatch(net, unet)
        if problem is not None:
            raise ValueError(problem)
    unet_nets = [net for net in nets if isinstance(net, (ControlNetModel, ControlNetUnionModel))]
    component: ControlNetModel | ControlNetUnionModel | MultiControlNetModel | MultiControlNetUnionModel = unet_nets[0]
    if len(unet_nets) > 1 and any(isinstance(net, ControlNetUnionModel) for net in unet_nets):
        component = MultiControlNetUnionModel(unet_nets)
    elif len(unet_nets) > 1:
        component = MultiControlNetModel([net for net in unet_nets if isinstance(net, ControlNetModel)])
    components = {**pipe.components, "controlnet": component}
    return Pipeline(controlnet_blocks(pipe.blocks), components, manager=pipe.manager, name=pipe.name, preset=_preset(pipe))


def _with_flux_controlnet(pipe: Pipeline, transformer: FluxTransformer2DModel, nets: tuple[AnyControlNet, ...]) -> Pipeline:
    """``with_controlnet`` for a Flux pipeline: Flux ControlNets that fit its transformer."""
    flux_nets: list[FluxControlNetModel] = []
    for net in nets:
        if not isinstance(net, FluxControlNetModel):
            raise ValueError(_MSG_OTHER_FAMILY.format(controlnet=family_name(net.params), model="transformer",
                family=flux_family_name(transformer.params), kind="UNet ControlNet", steers="an SD 1.x/2.x or SDXL UNet"))  # fmt: skip
        problem = flux_controlnet_mismatch(net, transformer)
        if problem is not None:
            raise ValueError(problem)
        flux_nets.append(net)
    component = flux_nets[0] if len(flux_nets) == 1 else FluxMultiControlNetModel(flux_nets)
    components = {**pipe.components, "controlnet": component}
    return Pipeline(flux_controlnet_blocks(pipe.blocks), components, manager=pipe.manager, name=pipe.name, preset=_preset(pipe))


def _controlled(base: Callable[..., Sequence], add: Callable[[AbstractBlock], AbstractBlock]) -> Callable[..., Sequence]:
    """A family's blocks function with ControlNet steps added."""

    def blocks(**settings: Any) -> Sequence:
        tree = add(base(**settings))
        assert isinstance(tree, Sequence)  # the steps are added inside the root, which stays a Sequence
        return tree

    return blocks


SD15_CONTROLNET = Family(
    "sd15_controlnet",
    _controlled(sd15.sd15_blocks, controlnet_blocks),
    sd15.default_guider,
    ("StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline", "StableDiffusionControlNetInpaintPipeline"),
)
"""diffusers' SD 1.x/2.x ControlNet pipelines: the ``sd15`` blocks with ControlNet steps and a ``controlnet`` component."""
SDXL_CONTROLNET = Family(
    "sdxl_controlnet",
    _controlled(sdxl.sdxl_blocks, controlnet_blocks),
    sdxl.default_guider,
    ("StableDiffusionXLControlNetPipeline", "StableDiffusionXLControlNetImg2ImgPipeline",
     "StableDiffusionXLControlNetInpaintPipeline", "StableDiffusionXLControlNetUnionPipeline",
     "StableDiffusionXLControlNetUnionImg2ImgPipeline", "StableDiffusionXLControlNetUnionInpaintPipeline"),
    settings=sdxl.SETTINGS,
)  # fmt: skip
"""diffusers' SDXL ControlNet pipelines (and the ControlNet-Union ones): the ``sdxl`` blocks with ControlNet steps."""
FLUX_CONTROLNET = Family(
    "flux_controlnet",
    _controlled(flux.flux_blocks, flux_controlnet_blocks),
    flux.default_guider,
    ("FluxControlNetPipeline", "FluxControlNetImg2ImgPipeline", "FluxControlNetInpaintPipeline"),
)
"""diffusers' Flux ControlNet pipelines: the ``flux`` blocks with Flux ControlNet steps."""

_CONTROLLED = {"sd15": SD15_CONTROLNET, "sdxl": SDXL_CONTROLNET, "flux": FLUX_CONTROLNET}


def _preset(pipe: Pipeline) -> PresetInfo | None:
    """The ControlNet family's preset for a pipeline loaded as a base family's, so that it saves as diffusers' ControlNet pipeline."""
    info = pipe.preset
    if info is None or info.family not in _CONTROLLED:
        return None
    return PresetInfo(_CONTROLLED[info.family].name, None, dict(info.settings), dict(info.sources))


__all__ = ["FLUX_CONTROLNET", "SD15_CONTROLNET", "SDXL_CONTROLNET", "controlnet_blocks", "with_controlnet"]
