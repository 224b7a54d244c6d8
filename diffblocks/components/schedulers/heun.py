"""Heun's second-order method on the probability-flow ODE (Karras et al., 2022)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, final

import torch
from jaxtyping import Float
from pydantic import Field
from torch import Tensor

from diffblocks.components.noise import Generator
from diffblocks.components.schedulers.betas import BetaSchedule
from diffblocks.components.schedulers.karras import AbstractKarrasScheduler, SigmaRespacingMixin
from diffblocks.components.schedulers.prediction import PredictionType, karras_data_prediction
from diffblocks.components.schedulers.state import SchedulerState, StepRecord


@final
class HeunDiscreteScheduler(SigmaRespacingMixin, AbstractKarrasScheduler):
    """Heun steps: an Euler predictor, then the trapezoidal corrector at the next sigma.

    Implements Algorithm 1 of Karras et al. (2022), "Elucidating the Design Space of
    Diffusion-Based Generative Models". Each step calls the model twice, so ``state.timesteps``
    repeats every interior timestep (``2 * num_inference_steps - 1`` entries) and the last step,
    to sigma 0, is a plain Euler step. Fields are diffusers' ``HeunDiscreteScheduler`` config keys.

    Example:
        >>> s = HeunDiscreteScheduler()
        >>> s.set_timesteps(3).timesteps.tolist()
        [999.0, 499.5, 499.5, 0.0, 0.0]
    """

    order: ClassVar[int] = 2
    fixed_config: ClassVar[Mapping[str, object]] = {"use_beta_sigmas": False}
    beta_schedules: ClassVar[frozenset[str]] = frozenset({"linear", "scaled_linear", "squaredcos_cap_v2", "exp"})

    beta_start: float = Field(default=0.00085, gt=0.0, lt=1.0)
    beta_end: float = Field(default=0.012, gt=0.0, lt=1.0)
    beta_schedule: BetaSchedule = "linear"
    prediction_type: PredictionType = "epsilon"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    clip_sample: bool = False
    clip_sample_range: float = Field(default=1.0, gt=0.0)

    def _model_schedule(self, num_steps: int) -> tuple[Tensor, Tensor]:
        """Every interior level twice: once as a step's end, once as the next step's start."""
        timesteps, levels = self._karras_schedule(num_steps, respace=self._sigma_respacing)
        return (
            torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]),
            torch.cat([levels[:1], levels[1:-1].repeat_interleave(2), levels[-1:]]),
        )

    def step(
        self,
        state: SchedulerState,
        model_output: Float[Tensor, "batch *rest"],
        step_index: int,
        sample: Float[Tensor, "batch *rest"],
        *,
        generator: Generator | None = None,
    ) -> Float[Tensor, "batch *rest"]:
        """Even positions predict with Euler; odd positions correct with the averaged slope."""
        j = state.position(step_index)
        levels = state.full_sigmas
        if j % 2 == 0:  # predictor: Euler from sigma_j to sigma_{j+1}
            sigma, sigma_next = levels[j], levels[j + 1]
            derivative = (sample - self._data_prediction(model_output, sample, sigma)) / sigma
            state.remember(step_index, StepRecord(derivative, sample), keep=2)
            return sample + derivative * (sigma_next - sigma)
        # corrector: the model was evaluated at the predicted point, at sigma_next
        sigma, sigma_next = levels[j - 1], levels[j]
        start = state.recall(step_index - 1, needed_by=step_index)
        slope_next = (sample - self._data_prediction(model_output, sample, sigma_next)) / sigma_next
        return start.sample + (start.output + slope_next) / 2 * (sigma_next - sigma)

    def _data_prediction(self, model_output: Tensor, sample: Tensor, sigma: float) -> Tensor:
        x0 = karras_data_prediction(self.prediction_type, model_output, sample, sigma=sigma)
        return x0.clamp(-self.clip_sample_range, self.clip_sample_range) if self.clip_sample else x0


__all__ = ["HeunDiscreteScheduler"]
