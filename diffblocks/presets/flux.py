"""Flux.1 dev and schnell: text-to-image and image-to-image, picked from the inputs.

One preset serves both models: the transformer's ``guidance_embeds`` decides the per-model
defaults (see :class:`~diffblocks.blocks.flux.FluxDefaults`) and whether the guidance scale is fed
to the model.
"""

from __future__ import annotations

from diffblocks.blocks import Branch, Loop, Sequence, Switch
from diffblocks.blocks.flux import (
    FluxDefaults,
    FluxEncodePrompt,
    FluxSetImageTimesteps,
    FluxSetTimesteps,
    PredictFlow,
    PrepareFluxConditions,
    PrepareFluxGuidance,
    PrepareFluxImageLatents,
    PrepareFluxLatents,
    PreprocessFluxImage,
    UnpackLatents,
)
from diffblocks.blocks.standard import DecodeImages, SchedulerStep
from diffblocks.components.guiders import ClassifierFreeGuidance
from diffblocks.presets.families import Family

PIPELINE_CLASSES = ("FluxPipeline", "FluxImg2ImgPipeline")


def default_guider() -> ClassifierFreeGuidance:
    """Classifier-free guidance at scale 1, which is off: dev distils guidance and schnell needs none.

    ``true_cfg_scale`` > 1 (with a negative prompt) turns it on per call.
    """
    return ClassifierFreeGuidance(guidance_scale=1.0)


def denoise_loop() -> Loop:
    """Predict the guided flow of the packed tokens, then step."""
    return Loop(PredictFlow(name="predict"), SchedulerStep(name="step"), name="denoise")


def flux_blocks() -> Sequence:
    """The Flux.1 workflows: img2img when ``image`` is given, else text2img."""
    start = Switch(
        Branch(
            "img2img",
            Sequence(PreprocessFluxImage(), FluxSetImageTimesteps(), PrepareFluxImageLatents(), name="img2img"),
            when=("image",),
        ),
        Branch("text2img", Sequence(PrepareFluxLatents(), FluxSetTimesteps(), name="text2img")),
        name="start",
    )
    return Sequence(
        FluxDefaults(),
        PrepareFluxGuidance(),
        FluxEncodePrompt(),
        start,
        PrepareFluxConditions(),
        denoise_loop(),
        UnpackLatents(),
        DecodeImages(),
        name="flux",
    )


FAMILY = Family("flux", flux_blocks, default_guider, PIPELINE_CLASSES)
"""The Flux family, as ``from_pretrained`` finds it."""
