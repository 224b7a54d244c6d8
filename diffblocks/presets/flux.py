"""Flux.1 dev and schnell: text-to-image, image-to-image and inpainting, picked from the inputs.

One preset serves both models: the transformer's ``guidance_embeds`` decides the per-model
defaults (see :class:`~diffblocks.blocks.flux.FluxDefaults`) and whether the guidance scale is fed
to the model.
"""

from __future__ import annotations

from diffblocks.blocks import AbstractBlock, Branch, Loop, Sequence, Switch
from diffblocks.blocks.flux import (
    BlendFluxMaskedLatents,
    FluxDefaults,
    FluxEncodePrompt,
    FluxSetImageTimesteps,
    FluxSetTimesteps,
    PredictFlow,
    PrepareFluxConditions,
    PrepareFluxGuidance,
    PrepareFluxImageLatents,
    PrepareFluxLatents,
    PrepareFluxMaskLatents,
    PreprocessFluxImage,
    PreprocessFluxInpaintImages,
    UnpackLatents,
)
from diffblocks.blocks.standard import DecodeImages, SchedulerStep
from diffblocks.components.guiders import ClassifierFreeGuidance
from diffblocks.presets.families import Family

PIPELINE_CLASSES = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
MODULAR_CLASSES = ("FluxModularPipeline", "FluxAutoBlocks")
"""diffusers' ``ModularPipeline`` class and blocks class for Flux, as its ``modular_model_index.json`` names them."""


def default_guider() -> ClassifierFreeGuidance:
    """Classifier-free guidance at scale 1, which is off: dev distils guidance and schnell needs none.

    ``true_cfg_scale`` > 1 (with a negative prompt) turns it on per call.
    """
    return ClassifierFreeGuidance(guidance_scale=1.0)


def denoise_loop(*, inpaint: bool = False) -> Loop:
    """Predict the guided flow of the packed tokens, then step; with ``inpaint``, then keep the image outside the mask."""
    if not inpaint:
        return Loop(PredictFlow(name="predict"), SchedulerStep(name="step"), name="denoise")
    return Loop(PredictFlow(name="predict"), SchedulerStep(name="step"), BlendFluxMaskedLatents(name="blend"), name="denoise")


def flux_blocks() -> Sequence:
    """The Flux.1 workflows: inpaint when ``mask_image`` is given, img2img when ``image`` is, else text2img.

    Each workflow runs its own loop, since inpainting blends the image back in after every step.
    """

    def workflow(name: str, *start: AbstractBlock) -> Sequence:
        return Sequence(*start, PrepareFluxConditions(), denoise_loop(inpaint=name == "inpaint"), name=name)

    inpaint = workflow(
        "inpaint", PreprocessFluxInpaintImages(), FluxSetImageTimesteps(), PrepareFluxImageLatents(), PrepareFluxMaskLatents()
    )
    start = Switch(
        # a mask alone picks inpainting too, so that a missing image is reported rather than the mask ignored
        Branch("inpaint", inpaint, when=("mask_image",)),
        Branch("img2img", workflow("img2img", PreprocessFluxImage(), FluxSetImageTimesteps(), PrepareFluxImageLatents()), when=("image",)),
        Branch("text2img", workflow("text2img", PrepareFluxLatents(), FluxSetTimesteps())),
        name="start",
    )
    return Sequence(FluxDefaults(), PrepareFluxGuidance(), FluxEncodePrompt(), start, UnpackLatents(), DecodeImages(), name="flux")


FAMILY = Family("flux", flux_blocks, default_guider, PIPELINE_CLASSES, modular=MODULAR_CLASSES)
"""The Flux family, as ``from_pretrained`` finds it."""
