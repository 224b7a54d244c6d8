"""Standard blocks shared by the UNet families: schedules, latents, guidance, the loop body, decoding."""

from diffblocks.blocks.standard.decode import DecodeImages
from diffblocks.blocks.standard.denoise import PredictNoise, ScaleModelInput, SchedulerStep
from diffblocks.blocks.standard.guidance import Guidance, PrepareGuidance
from diffblocks.blocks.standard.images import ImageLike, OutputType
from diffblocks.blocks.standard.latents import PrepareImageLatents, PrepareLatents
from diffblocks.blocks.standard.timesteps import SetImageTimesteps, SetTimesteps

__all__ = [
    "DecodeImages",
    "Guidance",
    "ImageLike",
    "OutputType",
    "PredictNoise",
    "PrepareGuidance",
    "PrepareImageLatents",
    "PrepareLatents",
    "ScaleModelInput",
    "SchedulerStep",
    "SetImageTimesteps",
    "SetTimesteps",
]
