"""Timestep schedules: blocks that ask the scheduler for the run's schedule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field

from diffblocks.blocks.block import Block, BlockIO, component
from diffblocks.blocks.errors import FieldError
from diffblocks.blocks.standard.latents import placement
from diffblocks.blocks.types import Shaped
from diffblocks.components.schedulers.base import AbstractScheduler, SchedulerState


class SetTimesteps(Block):
    """Make the run's schedule (text-to-image: the whole schedule)."""

    class Inputs(BlockIO):
        num_inference_steps: int = Field(50, ge=1, le=1000, description="denoising steps")

    class Outputs(BlockIO):
        timesteps: Shaped["steps"]
        schedule: SchedulerState

    scheduler: AbstractScheduler = component(description="the sampling algorithm")
    unet: torch.nn.Module = component(description="the denoiser; the schedule lives on its device")

    def __call__(self, inputs: Inputs) -> Outputs:
        return self._schedule(inputs.num_inference_steps, 1.0)

    def _schedule(self, steps: int, strength: float) -> Outputs:
        state = self.scheduler.set_timesteps(steps, device=placement(self.unet)[0], strength=strength)
        return self.Outputs(timesteps=state.timesteps, schedule=state)


class SetImageTimesteps(SetTimesteps):
    """Make the run's schedule and keep its last ``strength`` part (image-to-image, inpainting)."""

    class Inputs(SetTimesteps.Inputs):
        strength: float = Field(0.8, gt=0.0, le=1.0, description="how much of the schedule to run; 1 ignores the image")

    def check(self, user_inputs: Mapping[str, Any]) -> None:
        steps, strength = user_inputs["num_inference_steps"], user_inputs["strength"]
        if int(steps * strength) < 1:
            raise FieldError("strength", f"strength {strength} runs int({steps} * {strength}) = 0 of {steps} steps; raise it")

    def __call__(self, inputs: Inputs) -> SetTimesteps.Outputs:  # type: ignore[override]
        return self._schedule(inputs.num_inference_steps, inputs.strength)
