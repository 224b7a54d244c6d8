"""Inpainting inside the denoising loop, for both kinds of UNet.

An inpainting UNet (9 input channels) sees the mask and the masked image's latents beside the
noisy latents at every step. A plain UNet (4 channels) cannot; instead, after every step, the part
outside the mask is replaced by the original image's latents noised to the next step's level (the
blend of Lugmayr et al. 2022, RePaint, without resampling; diffusers calls it "legacy" inpainting).
Each block does nothing for the other kind of UNet, so one loop serves both.
"""

from __future__ import annotations

from typing import Literal

import torch

from diffblocks.blocks.block import Block, BlockIO, component
from diffblocks.blocks.fields import produced
from diffblocks.blocks.types import Float
from diffblocks.components.models.autoencoder_kl import AutoencoderKL
from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.components.schedulers.base import AbstractScheduler, SchedulerState

InpaintMode = Literal["concat", "blend"]


def inpaint_mode(unet: UNet2DConditionModel, vae: AutoencoderKL) -> InpaintMode:
    """``"concat"`` for an inpainting UNet (latents + mask + masked latents in), ``"blend"`` for a plain one.

    Raises:
        ValueError: the UNet's input channels fit neither.
    """
    latent, channels = vae.params.latent_channels, unet.params.in_channels
    if channels == 2 * latent + 1:
        return "concat"
    if channels == latent:
        return "blend"
    raise ValueError(
        f"the UNet takes {channels} input channels; inpainting needs {latent} (a plain UNet) or "
        f"{2 * latent + 1} (an inpainting UNet: {latent} latents + 1 mask + {latent} masked-image latents)"
    )


class AddMaskChannels(Block):
    """Put the mask and the masked image's latents beside the model input (inpainting UNets only)."""

    class Inputs(BlockIO):
        model_input: Float["batch channels height width"] = produced(description="the latents scaled for the model")
        mask: Float["batch channels height width"] = produced(description="the mask at latent size")
        masked_image_latents: Float["batch channels height width"] = produced(description="the masked image's latents")

    class Outputs(BlockIO):
        model_input: Float["batch channels height width"]

    unet: UNet2DConditionModel = component()

    def __call__(self, inputs: Inputs) -> Outputs:
        if self.unet.params.in_channels == inputs.model_input.shape[1]:
            return self.Outputs(model_input=inputs.model_input)
        model_input = torch.cat([inputs.model_input, inputs.mask, inputs.masked_image_latents], dim=1)
        return self.Outputs(model_input=model_input)


class BlendMaskedLatents(Block):
    """Keep the original image outside the mask, noised to the next step's level (plain UNets only)."""

    class Inputs(BlockIO):
        latents: Float["batch channels height width"]
        image_latents: Float["batch channels height width"] | None = produced(description="the image's latents")
        noise: Float["batch channels height width"] = produced(description="the starting noise")
        mask: Float["batch channels height width"] = produced(description="the mask at latent size")
        schedule: SchedulerState = produced(description="the scheduler's state for this run")
        step_index: int

    class Outputs(BlockIO):
        latents: Float["batch channels height width"]

    scheduler: AbstractScheduler = component()
    unet: UNet2DConditionModel = component()

    def __call__(self, inputs: Inputs) -> Outputs:
        original = inputs.image_latents
        if original is None or self.unet.params.in_channels != inputs.latents.shape[1]:
            return self.Outputs(latents=inputs.latents)
        following = inputs.step_index + 1
        if following < len(inputs.schedule.timesteps):
            original = self.scheduler.add_noise(inputs.schedule, original, inputs.noise, following)
        mask = inputs.mask
        return self.Outputs(latents=(1 - mask) * original + mask * inputs.latents)


__all__ = ["AddMaskChannels", "BlendMaskedLatents", "InpaintMode", "inpaint_mode"]
