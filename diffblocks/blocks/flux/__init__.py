"""Blocks specific to Flux.1 (dev and schnell): prompts, packed latents, shifted schedules, flow prediction."""

from diffblocks.blocks.flux.controlnet import PredictControlledFlow, PrepareFluxControlImage, flux_controlnet_mismatch
from diffblocks.blocks.flux.defaults import DEV, SCHNELL, FluxDefaults, VariantDefaults, variant_defaults
from diffblocks.blocks.flux.denoise import PredictFlow
from diffblocks.blocks.flux.encode import FluxEncodePrompt
from diffblocks.blocks.flux.guidance import PrepareFluxConditions, PrepareFluxGuidance
from diffblocks.blocks.flux.inpaint import BlendFluxMaskedLatents, PrepareFluxMaskLatents, PreprocessFluxInpaintImages
from diffblocks.blocks.flux.ip_adapter import EncodeFluxImagePrompt
from diffblocks.blocks.flux.latents import PrepareFluxImageLatents, PrepareFluxLatents, PreprocessFluxImage, UnpackLatents
from diffblocks.blocks.flux.timesteps import FluxSetImageTimesteps, FluxSetTimesteps

__all__ = [
    "BlendFluxMaskedLatents",
    "DEV",
    "SCHNELL",
    "EncodeFluxImagePrompt",
    "FluxDefaults",
    "FluxEncodePrompt",
    "FluxSetImageTimesteps",
    "FluxSetTimesteps",
    "PredictControlledFlow",
    "PredictFlow",
    "PrepareFluxConditions",
    "PrepareFluxControlImage",
    "PrepareFluxGuidance",
    "PrepareFluxImageLatents",
    "PrepareFluxLatents",
    "PrepareFluxMaskLatents",
    "PreprocessFluxInpaintImages",
    "PreprocessFluxImage",
    "UnpackLatents",
    "VariantDefaults",
    "flux_controlnet_mismatch",
    "variant_defaults",
]
