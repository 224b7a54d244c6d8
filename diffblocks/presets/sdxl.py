"""Stable Diffusion XL: text-to-image, image-to-image and inpainting, picked from the inputs."""

from __future__ import annotations

from diffblocks.blocks import Sequence
from diffblocks.blocks.sd import EncodePromptXL, PrepareTimeIds
from diffblocks.blocks.standard import DecodeImages
from diffblocks.components.guiders import ClassifierFreeGuidance
from diffblocks.presets.families import Family
from diffblocks.presets.sd15 import unet_workflows

PIPELINE_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
SETTINGS = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")
"""Index settings (``model_index.json`` keys beside the components) that :func:`sdxl_blocks` reads."""


def default_guider() -> ClassifierFreeGuidance:
    """Classifier-free guidance at SDXL's usual scale."""
    return ClassifierFreeGuidance(guidance_scale=5.0)


def sdxl_blocks(*, force_zeros_for_empty_prompt: bool = True, requires_aesthetics_score: bool = False) -> Sequence:
    """The SDXL pipeline: encode with both CLIP encoders, run the chosen workflow with size conditioning, decode.

    Args:
        force_zeros_for_empty_prompt: without a negative prompt, guide away from zero embeddings
            (SDXL base) instead of the encoding of ``""``.
        requires_aesthetics_score: condition on an aesthetic score instead of the target size
            (the SDXL refiner).
    """
    return Sequence(
        EncodePromptXL(name="encode_prompt", force_zeros_for_empty_prompt=force_zeros_for_empty_prompt),
        unet_workflows(lambda: (PrepareTimeIds(requires_aesthetics_score=requires_aesthetics_score),)),
        DecodeImages(),
        name="sdxl",
    )


FAMILY = Family("sdxl", sdxl_blocks, default_guider, PIPELINE_CLASSES, settings=SETTINGS)
"""The SDXL family, as ``from_pretrained`` finds it."""
