"""The body of the denoising loop: scale the input, predict with guidance, take a scheduler step."""

from __future__ import annotations

from torch import Tensor

from diffblocks.blocks.block import Block, BlockIO, component
from diffblocks.blocks.fields import produced
from diffblocks.blocks.standard.guidance import Guidance
from diffblocks.blocks.types import Float
from diffblocks.components.denoisers import PredictionType, UNetDenoiser
from diffblocks.components.models.ip_adapter import IPAdapterModel, MultiIPAdapterModel
from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.components.noise import Generator
from diffblocks.components.schedulers.base import AbstractScheduler, SchedulerState


class ScaleModelInput(Block):
    """The latents as the model expects them at this step (Euler-type schedulers rescale)."""

    class Inputs(BlockIO):
        latents: Float["batch channels height width"]
        schedule: SchedulerState = produced(description="the scheduler's state for this run")
        step_index: int

    class Outputs(BlockIO):
        model_input: Float["batch channels height width"]

    scheduler: AbstractScheduler = component()

    def __call__(self, inputs: Inputs) -> Outputs:
        return self.Outputs(model_input=self.scale(inputs.latents, inputs.schedule, inputs.step_index))

    def scale(self, latents: Tensor, schedule: SchedulerState, step_index: int) -> Tensor:
        """The model input at ``step_index``: the scheduler's scaling of ``latents``; override to precondition otherwise."""
        return self.scheduler.scale_model_input(schedule, latents, step_index)


class PredictNoise(Block):
    """Run the UNet for every pass the guider asks for and combine them into one guided prediction.

    The UNet runs through its denoiser wrapper (:meth:`denoiser`), called once per guidance pass as
    ``predict(x, conditioning)`` with this step's timestep bound.
    """

    class Inputs(BlockIO):
        model_input: Float["batch channels height width"] = produced(description="the latents scaled for the model")
        t: Tensor
        guidance: Guidance = produced(description="the guider and its passes for this run")
        step_index: int
        num_steps: int

    class Outputs(BlockIO):
        noise_pred: Float["batch channels height width"]

    unet: UNet2DConditionModel = component(description="the denoiser")
    scheduler: AbstractScheduler = component(optional=True, description="its prediction_type is what the UNet predicts")
    ip_adapter: IPAdapterModel | MultiIPAdapterModel = component(
        optional=True, description="reads the image prompt's tokens in the conditioning (docs/ip_adapter.md)"
    )

    def __call__(self, inputs: Inputs) -> Outputs:
        denoiser = self.denoiser()
        noise_pred = inputs.guidance.prediction(
            denoiser.at(inputs.t),
            latents=inputs.model_input,
            step_index=inputs.step_index,
            num_steps=inputs.num_steps,
            model=denoiser.model,
        )
        return self.Outputs(noise_pred=noise_pred)

    def denoiser(self) -> UNetDenoiser:
        """The UNet as a denoiser, made at every step (it is a light wrapper, so a swapped UNet is seen at once)."""
        return UNetDenoiser(self.unet, prediction_type=prediction_type(self.scheduler), ip_adapter=self.ip_adapter)


def prediction_type(scheduler: AbstractScheduler | None) -> PredictionType:
    """What a UNet predicts: diffusers keeps it in the scheduler config (``prediction_type``, else noise)."""
    # a field of every UNet scheduler that the base does not declare (flow matching has none);
    # __pydantic_fields__ because the class's model_fields costs ~1 µs, at every step
    if scheduler is None or "prediction_type" not in type(scheduler).__pydantic_fields__:
        return "epsilon"
    found: PredictionType = getattr(scheduler, "prediction_type")
    return found


class SchedulerStep(Block):
    """Advance the latents one step with the scheduler (any layout: image latents or packed tokens)."""

    class Inputs(BlockIO):
        latents: Float["batch ..."]
        noise_pred: Float["batch ..."] = produced(description="the guided prediction")
        schedule: SchedulerState = produced(description="the scheduler's state for this run")
        step_index: int
        generator: Generator | None = None

    class Outputs(BlockIO):
        latents: Float["batch ..."]

    scheduler: AbstractScheduler = component()

    def __call__(self, inputs: Inputs) -> Outputs:
        latents = self.step(inputs.latents, inputs.noise_pred, inputs.schedule, inputs.step_index, inputs.generator)
        return self.Outputs(latents=latents.to(inputs.latents.dtype))

    def step(
        self, latents: Tensor, noise_pred: Tensor, schedule: SchedulerState, step_index: int, generator: Generator | None
    ) -> Tensor:
        """The latents after step ``step_index``: the scheduler's update from ``noise_pred``.

        Override it to change the update (a new sampler rule, an edit of the latents after each
        step); the result is cast back to the latents' dtype.
        """
        return self.scheduler.step(schedule, noise_pred, step_index, latents, generator=generator)


