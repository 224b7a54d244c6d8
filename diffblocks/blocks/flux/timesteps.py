"""Flux.1 schedules: ``linspace(1, 1/n, n)`` sigmas, shifted by a ``mu`` that grows with the image's token count."""

from __future__ import annotations

from pydantic import Field

from diffblocks.blocks.block import Block, BlockIO, component
from diffblocks.blocks.flux.latents import token_size
from diffblocks.blocks.standard.latents import placement
from diffblocks.blocks.types import Shaped
from diffblocks.components.models.autoencoder_kl import AutoencoderKL
from diffblocks.components.models.flux import FluxTransformer2DModel
from diffblocks.components.schedulers.flow_match import FlowMatchEulerDiscreteScheduler, flux_sigmas
from diffblocks.components.schedulers.state import SchedulerState


class FluxScheduleInputs(BlockIO):
    """What a Flux schedule depends on: the step count (or custom sigmas) and the image size."""

    num_inference_steps: int
    sigmas: list[float] | None = None
    height: int
    width: int


class FluxScheduleOutputs(BlockIO):
    timesteps: Shaped["steps"]
    schedule: SchedulerState
    mu: float | None


class AbstractFluxSetTimesteps(Block):
    """Make the run's schedule as diffusers' Flux pipelines do (Esser et al. 2024, resolution-dependent shift).

    Sigmas are ``linspace(1, 1/n, n)`` (or the call's ``sigmas``). A scheduler with
    ``use_dynamic_shifting`` (dev) shifts them by ``mu``, linear in the image's token count
    ``(height // 16) * (width // 16)`` between the config's ``base_shift`` at ``base_image_seq_len``
    and ``max_shift`` at ``max_image_seq_len``; otherwise (schnell) ``mu`` is None and the config's
    fixed ``shift`` applies. :meth:`schedule` is the step to override for another schedule.
    """

    Outputs = FluxScheduleOutputs

    scheduler: FlowMatchEulerDiscreteScheduler = component(description="flow-matching Euler, with Flux's shift")
    vae: AutoencoderKL = component(description="gives the pixels per token")
    transformer: FluxTransformer2DModel = component(description="the schedule lives on its device")

    def schedule(self, inputs: FluxScheduleInputs, *, strength: float = 1.0) -> FluxScheduleOutputs:
        """The shifted schedule for ``inputs``, keeping its last ``strength`` part; override to schedule otherwise."""
        steps, scheduler = inputs.num_inference_steps, self.scheduler
        sigmas = inputs.sigmas if inputs.sigmas is not None else flux_sigmas(steps)
        mu = None
        if scheduler.use_dynamic_shifting:
            size = token_size(self.vae)
            mu = scheduler.mu_for_image_seq_len((inputs.height // size) * (inputs.width // size))
        device = placement(self.transformer)[0]
        state = scheduler.set_timesteps(steps, device=device, strength=strength, mu=mu, sigmas=sigmas)
        return FluxScheduleOutputs(timesteps=state.timesteps, schedule=state, mu=mu)


class FluxSetTimesteps(AbstractFluxSetTimesteps):
    """Make the run's whole Flux schedule (text-to-image)."""

    Inputs = FluxScheduleInputs

    def __call__(self, inputs: FluxScheduleInputs) -> FluxScheduleOutputs:
        return self.schedule(inputs)


class FluxSetImageTimesteps(AbstractFluxSetTimesteps):
    """Make the schedule and keep its last ``strength`` part, as diffusers' ``FluxImg2ImgPipeline`` does.

    ``int(n - n * strength)`` steps are skipped from the noisy end; every strength in (0, 1] keeps
    at least one step.
    """

    class Inputs(FluxScheduleInputs):
        strength: float = Field(0.6, gt=0.0, le=1.0, description="how much of the schedule to run; 1 ignores the image")

    def __call__(self, inputs: Inputs) -> FluxScheduleOutputs:
        return self.schedule(inputs, strength=inputs.strength)


__all__ = ["AbstractFluxSetTimesteps", "FluxScheduleInputs", "FluxScheduleOutputs", "FluxSetImageTimesteps", "FluxSetTimesteps"]
