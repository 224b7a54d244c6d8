"""Timestep schedules: blocks that ask the scheduler for the run's schedule.

Text-to-image runs the whole schedule; image-to-image and inpainting keep its last ``strength``
part. The three blocks share :class:`AbstractSetTimesteps`, whose :meth:`~AbstractSetTimesteps.schedule`
is the step a researcher overrides to make timesteps another way.
"""

from __future__ import annotations

import torch
from pydantic import Field

from diffblocks.blocks.block import Block, BlockIO, component, known
from diffblocks.blocks.errors import FieldError
from diffblocks.blocks.standard.latents import placement
from diffblocks.blocks.types import Shaped
from diffblocks.components.schedulers.base import AbstractScheduler, SchedulerState

STRENGTH = "how much of the schedule to run; 1 ignores the image"


class ScheduleOutputs(BlockIO):
    """The run's timesteps and the scheduler's state for them."""

    timesteps: Shaped["steps"]
    schedule: SchedulerState


class AbstractSetTimesteps(Block):
    """Make the run's schedule with the scheduler, on the denoiser's device."""

    Outputs = ScheduleOutputs

    scheduler: AbstractScheduler = component(description="the sampling algorithm")
    unet: torch.nn.Module = component(description="the denoiser; the schedule lives on its device")

    def schedule(self, num_inference_steps: int, *, strength: float = 1.0) -> SchedulerState:
        """The scheduler's state for ``num_inference_steps`` steps, keeping the last ``strength`` part.

        Override it in a subclass to make the timesteps another way; the state's ``timesteps``
        are what the denoising loop runs over.
        """
        return self.scheduler.set_timesteps(num_inference_steps, device=placement(self.unet)[0], strength=strength)

    def outputs(self, state: SchedulerState) -> ScheduleOutputs:
        return ScheduleOutputs(timesteps=state.timesteps, schedule=state)


class SetTimesteps(AbstractSetTimesteps):
    """Make the run's whole schedule (text-to-image)."""

    class Inputs(BlockIO):
        num_inference_steps: int = Field(50, ge=1, le=1000, description="denoising steps")

    def __call__(self, inputs: Inputs) -> ScheduleOutputs:
        return self.outputs(self.schedule(inputs.num_inference_steps))


class StrengthInputs(BlockIO):
    """A step count and the part of the schedule to run."""

    num_inference_steps: int = Field(50, ge=1, le=1000, description="denoising steps")
    strength: float = Field(0.8, gt=0.0, le=1.0, description=STRENGTH)


class AbstractSetPartialTimesteps(AbstractSetTimesteps):
    """Make the run's schedule and keep its last ``strength`` part; a concrete block sets the default strength."""

    def check(self, inputs: StrengthInputs) -> None:
        check_strength(known(inputs, "num_inference_steps"), known(inputs, "strength"))

    def __call__(self, inputs: StrengthInputs) -> ScheduleOutputs:
        return self.outputs(self.schedule(inputs.num_inference_steps, strength=inputs.strength))


class SetImageTimesteps(AbstractSetPartialTimesteps):
    """Make the run's schedule and keep its last ``strength`` part (image-to-image)."""

    Inputs = StrengthInputs


def check_strength(steps: int | None, strength: float | None) -> None:
    """``strength`` must keep at least one of the run's steps."""
    if steps is not None and strength is not None and int(steps * strength) < 1:
        raise FieldError("strength", f"strength {strength} runs int({steps} * {strength}) = 0 of {steps} steps; raise it")


__all__ = [
    "AbstractSetPartialTimesteps",
    "AbstractSetTimesteps",
    "ScheduleOutputs",
    "SetImageTimesteps",
    "SetTimesteps",
    "StrengthInputs",
    "check_strength",
]
