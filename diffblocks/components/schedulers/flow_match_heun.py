"""Heun's method on a flow-matching / rectified-flow ODE (Karras et al., 2022; Lipman et al., 2022)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, final

import numpy as np
import torch
from jaxtyping import Float
from pydantic import Field
from torch import Tensor

from diffblocks.components.noise import Generator
from diffblocks.components.schedulers.base import MAX_TRAIN_TIMESTEPS, AbstractScheduler
from diffblocks.components.schedulers.flow_match import FlowMatchEulerDiscreteScheduler, flow_add_noise
from diffblocks.components.schedulers.state import SchedulerState, StepRecord, flow_strength_begin


@final
class FlowMatchHeunDiscreteScheduler(AbstractScheduler):
    """Heun steps along the predicted velocity: an Euler predictor, then the trapezoidal corrector.

    Algorithm 1 of Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based Generative
    Models", on the flow ODE ``dx/dsigma = v`` of flow matching (Lipman et al., 2022), where the
    model predicts ``v = eps - x0`` along ``x = (1 - sigma) x0 + sigma eps``. The noise levels are
    those of :class:`FlowMatchEulerDiscreteScheduler` with a fixed ``shift``; each step calls the
    model twice, so every interior timestep is repeated (``2 n - 1`` calls; the last step, to
    sigma 0, is a plain Euler step). Fields are diffusers' ``FlowMatchHeunDiscreteScheduler``
    config keys; it takes no ``mu`` or custom sigmas, as in diffusers.

    Example:
        >>> s = FlowMatchHeunDiscreteScheduler(shift=3.0)
        >>> [round(t) for t in s.set_timesteps(3).timesteps.tolist()]
        [1000, 751, 751, 9, 9]
    """

    order: ClassVar[int] = 2

    num_train_timesteps: int = Field(default=1000, ge=1, le=MAX_TRAIN_TIMESTEPS)
    shift: float = Field(default=1.0, gt=0.0)

    def set_timesteps(
        self,
        num_inference_steps: int,
        *,
        device: torch.device | str | None = None,
        strength: float = 1.0,
        mu: float | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> SchedulerState:
        """The flow-matching Euler schedule with every interior level twice: a step's end, then the next's start."""
        self._check_request(num_inference_steps, mu=mu, sigmas=sigmas)
        euler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.shift)
        plain = euler.set_timesteps(num_inference_steps)
        timesteps, levels = plain.timesteps, torch.tensor(plain.full_sigmas, dtype=torch.float32)
        return self._build_state(
            torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]),
            torch.cat([levels[:1], levels[1:-1].repeat_interleave(2), levels[-1:]]),
            num_inference_steps=num_inference_steps,
            strength=strength,
            device=device,
        )

    def _begin_index(self, num_inference_steps: int, strength: float) -> int:
        """First call run for ``strength``: flow pipelines' skipped steps, two calls each."""
        return flow_strength_begin(num_inference_steps, strength) * self.order

    def step(
        self,
        state: SchedulerState,
        model_output: Float[Tensor, "batch *rest"],
        step_index: int,
        sample: Float[Tensor, "batch *rest"],
        *,
        generator: Generator | None = None,
    ) -> Float[Tensor, "batch *rest"]:
        """Even positions predict with Euler; odd positions correct with the averaged velocity."""
        j = state.position(step_index)
        levels = state.full_sigmas
        sample = sample.to(torch.float32)
        if j % 2 == 0:  # predictor: Euler from sigma_j to sigma_{j+1}
            sigma, sigma_next = levels[j], levels[j + 1]
            derivative = (sample - (sample - model_output * sigma)) / sigma  # v, rounded as diffusers rounds it
            state.remember(step_index, StepRecord(derivative, sample), keep=2)
            prev_sample = sample + derivative * _float32_step(sigma, sigma_next)
            return prev_sample.to(model_output.dtype)
        # corrector: the model was evaluated at the predicted point, at sigma_next
        sigma, sigma_next = levels[j - 1], levels[j]
        start = state.recall(step_index - 1, needed_by=step_index)
        slope_next = (sample - (sample - model_output * sigma_next)) / sigma_next
        prev_sample = start.sample + 0.5 * (start.output + slope_next) * _float32_step(sigma, sigma_next)
        return prev_sample.to(model_output.dtype)

    def add_noise(
        self,
        state: SchedulerState,
        original: Float[Tensor, "batch *rest"],
        noise: Float[Tensor, "batch *rest"],
        step_index: int,
    ) -> Float[Tensor, "batch *rest"]:
        """``sigma * noise + (1 - sigma) * original``: the point of the straight path at this step."""
        return flow_add_noise(state, original, noise, step_index)


def _float32_step(sigma: float, sigma_next: float) -> float:
    """``sigma_next - sigma`` rounded to float32, as diffusers subtracts its float32 sigmas."""
    return float(np.float32(sigma_next) - np.float32(sigma))


__all__ = ["FlowMatchHeunDiscreteScheduler"]
