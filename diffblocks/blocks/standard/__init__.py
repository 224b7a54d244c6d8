"""Standard blocks shared by the UNet families: schedules, latents, guidance, the loop body, decoding."""

from diffblocks.blocks.standard.controlnet import PredictControlledNoise, PrepareControlImage
from diffblocks.blocks.standard.decode import DecodeImages
from diffblocks.blocks.standard.denoise import PredictNoise, ScaleModelInput, SchedulerStep
from diffblocks.blocks.standard.guidance import Guidance, PrepareGuidance
from diffblocks.blocks.standard.images import ImageLike, OutputType
from diffblocks.blocks.standard.ip_adapter import EncodeImagePrompt
from diffblocks.blocks.standard.inpaint import PrepareInpaintImages, PrepareInpaintLatents, PrepareMaskLatents, SetInpaintTimesteps
from diffblocks.blocks.standard.inpaint_loop import AddMaskChannels, BlendMaskedLatents, inpaint_mode
from diffblocks.blocks.standard.latents import PrepareImageLatents, PrepareLatents
from diffblocks.blocks.standard.masks import MaskLike
from diffblocks.blocks.standard.timesteps import AbstractSetTimesteps, ScheduleOutputs, SetImageTimesteps, SetTimesteps

__all__ = [
    "AbstractSetTimesteps",
    "AddMaskChannels",
    "BlendMaskedLatents",
    "DecodeImages",
    "EncodeImagePrompt",
    "Guidance",
    "ImageLike",
    "MaskLike",
    "OutputType",
    "PredictControlledNoise",
    "PredictNoise",
    "PrepareControlImage",
    "PrepareGuidance",
    "PrepareImageLatents",
    "PrepareInpaintImages",
    "PrepareInpaintLatents",
    "PrepareLatents",
    "PrepareMaskLatents",
    "ScaleModelInput",
    "ScheduleOutputs",
    "SchedulerStep",
    "SetImageTimesteps",
    "SetInpaintTimesteps",
    "SetTimesteps",
    "inpaint_mode",
]
