"""Stable Diffusion 1.x/2.x: text-to-image, image-to-image and inpainting, picked from the inputs."""

from __future__ import annotations

from collections.abc import Callable

from diffblocks.blocks import AbstractBlock, Branch, Loop, Sequence, Switch
from diffblocks.blocks.sd import EncodePrompt
from diffblocks.blocks.standard import (
    AddMaskChannels,
    BlendMaskedLatents,
    DecodeImages,
    PredictNoise,
    PrepareGuidance,
    PrepareImageLatents,
    PrepareInpaintImages,
    PrepareInpaintLatents,
    PrepareLatents,
    PrepareMaskLatents,
    ScaleModelInput,
    SchedulerStep,
    SetImageTimesteps,
    SetInpaintTimesteps,
    SetTimesteps,
)
from diffblocks.components.guiders import ClassifierFreeGuidance
from diffblocks.presets.families import Family

PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")


def default_guider() -> ClassifierFreeGuidance:
    """Classifier-free guidance at SD's usual scale."""
    return ClassifierFreeGuidance(guidance_scale=7.5)


def denoise_loop(*, inpaint: bool = False) -> Loop:
    """Scale the input, predict with guidance, step: the loop every UNet family shares.

    With ``inpaint``, the mask channels join the model input before the prediction (inpainting
    UNets) and the kept region is blended back after the step (plain UNets).
    """
    if not inpaint:
        return Loop(ScaleModelInput(name="scale"), PredictNoise(name="predict"), SchedulerStep(name="step"), name="denoise")
    return Loop(
        ScaleModelInput(name="scale"),
        AddMaskChannels(name="add_mask"),
        PredictNoise(name="predict"),
        SchedulerStep(name="step"),
        BlendMaskedLatents(name="blend"),
        name="denoise",
    )


def unet_workflows(conditioning: Callable[[], tuple[AbstractBlock, ...]] = tuple) -> Switch:
    """The UNet families' workflows: inpaint when ``mask_image`` is given, img2img when ``image`` is, else text2img.

    Args:
        conditioning: makes blocks that run after the latents are prepared and before guidance
            (SDXL adds its size conditioning there, which needs the run's final size).
    """

    def workflow(name: str, *start: AbstractBlock) -> Sequence:
        loop = denoise_loop(inpaint=name == "inpaint")
        return Sequence(*start, *conditioning(), PrepareGuidance(), loop, name=name)

    inpaint = workflow(
        "inpaint",
        SetInpaintTimesteps(name="set_timesteps"),
        PrepareInpaintImages(name="prepare_images"),
        PrepareInpaintLatents(name="prepare_latents"),
        PrepareMaskLatents(name="prepare_mask_latents"),
    )
    img2img = workflow("img2img", SetImageTimesteps(name="set_timesteps"), PrepareImageLatents(name="prepare_latents"))
    text2img = workflow("text2img", SetTimesteps(name="set_timesteps"), PrepareLatents(name="prepare_latents"))
    return Switch(
        # a mask alone picks inpainting too, so that a missing image is reported rather than the mask ignored
        Branch("inpaint", inpaint, when=("mask_image",)),
        Branch("img2img", img2img, when=("image",)),
        Branch("text2img", text2img),
        name="workflow",
    )


def sd15_blocks() -> Sequence:
    """The SD 1.x/2.x pipeline: encode the prompt, run the chosen workflow, decode."""
    return Sequence(EncodePrompt(), unet_workflows(), DecodeImages(), name="sd15")


FAMILY = Family("sd15", sd15_blocks, default_guider, PIPELINE_CLASSES)
"""The SD 1.x/2.x family, as ``from_pretrained`` finds it."""
