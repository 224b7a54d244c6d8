"""Pseudo numerical methods for diffusion models: PRK warm-up and PLMS (Liu et al., 2022)."""

from __future__ import annotations

import math
from typing import Literal, final

import numpy as np
from jaxtyping import Float
from torch import Tensor

from diffblocks.components.noise import Generator
from diffblocks.components.schedulers.alpha_bar import AbstractAlphaBarScheduler
from diffblocks.components.schedulers.prediction import noise_prediction
from diffblocks.components.schedulers.state import SchedulerState, StepRecord

_PRK_STEPS = 12  # three Runge-Kutta steps of four model calls each
_PRK_WEIGHTS = (1 / 6, 1 / 3, 1 / 3, 1 / 6)


@final
class PNDMScheduler(AbstractAlphaBarScheduler):
    """PNDM: linear multistep (PLMS) on the DDIM transfer, after a pseudo Runge-Kutta warm-up.

    Implements Liu et al. (2022), "Pseudo Numerical Methods for Diffusion Models on Manifolds".
    With ``skip_prk_steps`` (as Stable Diffusion's configs set) the warm-up is replaced by
    lower-order linear multistep, the first step taken twice (a pseudo improved Euler step);
    the schedule then has ``num_inference_steps + 1`` model calls.
    Fields are diffusers' ``PNDMScheduler`` config keys.

    Example:
        >>> s = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
        >>> s.set_timesteps(4).timesteps.tolist()
        [751, 501, 501, 251, 1]
    """

    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"

    def _model_timesteps(self, num_inference_steps: int, *, strength: float) -> np.ndarray:
        """The spaced timesteps with the first one repeated (PLMS), or with the PRK half-steps in front."""
        ascending = super()._model_timesteps(num_inference_steps, strength=strength)[::-1]
        if self.skip_prk_steps:
            # the first timestep appears twice: PLMS evaluates it again to average two slopes
            return np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        if num_inference_steps < 4:
            raise ValueError(f"the PRK warm-up needs num_inference_steps >= 4, got {num_inference_steps}.")
        if strength < 1.0:
            raise ValueError(
                f"the PRK warm-up cannot start part-way (strength {strength}); "
                "use skip_prk_steps=True for image-to-image."
            )
        half = self.num_train_timesteps // num_inference_steps // 2
        prk = ascending[-4:].repeat(2) + np.tile(np.array([0, half]), 4)
        return np.concatenate([prk[:-1].repeat(2)[1:-1][::-1], ascending[:-3][::-1]])

    def step(
        self,
        state: SchedulerState,
        model_output: Float[Tensor, "batch *rest"],
        step_index: int,
        sample: Float[Tensor, "batch *rest"],
        *,
        generator: Generator | None = None,
    ) -> Float[Tensor, "batch *rest"]:
        """One PRK sub-step (the first 12 calls without ``skip_prk_steps``) or one PLMS step."""
        t = int(state.full_timesteps[state.position(step_index)])
        stride = self.num_train_timesteps // state.num_inference_steps
        state.remember(step_index, StepRecord(model_output, sample), keep=_PRK_STEPS + 1)
        if not self.skip_prk_steps and step_index < _PRK_STEPS:
            return self._prk_step(state, model_output, step_index, t, stride)

        if self.skip_prk_steps and step_index == 1:
            # second call at the first timestep: redo the first step with the averaged slope
            first = state.recall(0, needed_by=1)
            eps = (model_output + first.output) / 2
            return self._transfer(first.sample, eps, t + stride, t)
        past = [state.recall(k, needed_by=step_index).output for k in self._plms_history(step_index)]
        if len(past) == 1:
            eps = past[0]
        elif len(past) == 2:
            eps = (3 * past[1] - past[0]) / 2
        elif len(past) == 3:
            eps = (23 * past[2] - 16 * past[1] + 5 * past[0]) / 12
        else:  # fourth-order Adams-Bashforth, Eq. 12
            eps = (55 * past[3] - 59 * past[2] + 37 * past[1] - 9 * past[0]) / 24
        return self._transfer(sample, eps, t, t - stride)

    def _plms_history(self, step_index: int) -> list[int]:
        """Steps whose outputs PLMS combines at ``step_index``, oldest first (at most four)."""
        if self.skip_prk_steps:
            # step 1 re-evaluates step 0's timestep and is not part of the history
            candidates = [0, *range(2, step_index + 1)]
        else:
            candidates = [0, 4, 8, *range(_PRK_STEPS, step_index + 1)]
        return candidates[-4:]

    def _prk_step(self, state: SchedulerState, model_output: Tensor, step_index: int, t: int, stride: int) -> Tensor:
        """Sub-step ``step_index % 4`` of a classic fourth-order Runge-Kutta step over ``stride``."""
        group, sub = divmod(step_index, 4)
        start = state.recall(group * 4, needed_by=step_index)
        t_start = int(state.full_timesteps[state.begin_index + group * 4])
        prev_t = t - (0 if sub % 2 else stride // 2)
        if sub < 3:
            return self._transfer(start.sample, model_output, t_start, prev_t)
        slope: Tensor | int = 0
        for k in range(3):
            slope = slope + _PRK_WEIGHTS[k] * state.recall(group * 4 + k, needed_by=step_index).output
        return self._transfer(start.sample, slope + _PRK_WEIGHTS[3] * model_output, t_start, prev_t)

    def _transfer(self, sample: Tensor, model_output: Tensor, t: int, prev_t: int) -> Tensor:
        """The transfer part ``phi`` of PNDM: a DDIM step from ``t`` to ``prev_t`` (Liu et al., 2022, Eq. 11)."""
        abar = self.training_noise.abar
        abar_t = abar[t]
        abar_prev = abar[prev_t] if prev_t >= 0 else (1.0 if self.set_alpha_to_one else abar[0])
        eps = noise_prediction(
            self.prediction_type, model_output, sample, alpha=math.sqrt(abar_t), sigma=math.sqrt(1 - abar_t)
        )
        denominator = abar_t * math.sqrt(1 - abar_prev) + math.sqrt(abar_t * (1 - abar_t) * abar_prev)
        return math.sqrt(abar_prev / abar_t) * sample - (abar_prev - abar_t) / denominator * eps


__all__ = ["PNDMScheduler"]
