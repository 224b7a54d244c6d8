"""Stable Diffusion 1.x/2.x: text-to-image and image-to-image, picked from the inputs."""

from __future__ import annotations

from diffblocks.blocks import Branch, Loop, Sequence, Switch
from diffblocks.blocks.sd import EncodePrompt
from diffblocks.blocks.standard import (
    DecodeImages,
    PredictNoise,
    PrepareGuidance,
    PrepareImageLatents,
    PrepareLatents,
    ScaleModelInput,
    SchedulerStep,
    SetImageTimesteps,
    SetTimesteps,
)
from diffblocks.components.guiders import ClassifierFreeGuidance

PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")


def default_guider() -> ClassifierFreeGuidance:
    """Classifier-free guidance at SD's usual scale."""
    return ClassifierFreeGuidance(guidance_scale=7.5)


def denoise_loop() -> Loop:
    """Scale the input, predict with guidance, step: the loop every UNet family shares."""
    return Loop(ScaleModelInput(name="scale"), PredictNoise(name="predict"), SchedulerStep(name="step"), name="denoise")


def sd15_blocks() -> Sequence:
    """The SD 1.x/2.x workflows: img2img when ``image`` is given, else text2img."""
    start = Switch(
        Branch("img2img", Sequence(SetImageTimesteps(), PrepareImageLatents(), name="img2img"), when=("image",)),
        Branch("text2img", Sequence(SetTimesteps(), PrepareLatents(), name="text2img")),
        name="start",
    )
    return Sequence(EncodePrompt(), start, PrepareGuidance(), denoise_loop(), DecodeImages(), name="sd15")
