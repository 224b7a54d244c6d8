"""DPM-Solver-2 in sigma: an Euler half-step to a midpoint, then the full step with its slope (Karras et al., 2022)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import ClassVar, Literal, final

import numpy as np
import torch
from jaxtyping import Float
from pydantic import Field
from torch import Tensor

from diffblocks.components.noise import Generator
from diffblocks.components.schedulers.betas import BetaSchedule
from diffblocks.components.schedulers.karras import AbstractKarrasScheduler, SigmaRespacingMixin, float32_tensor
from diffblocks.components.schedulers.prediction import karras_data_prediction
from diffblocks.components.schedulers.schedule import interpolate_sigmas, respace_sigmas, sigma_to_t, spaced_timesteps
from diffblocks.components.schedulers.state import SchedulerState, StepRecord


def log_midpoint(start: Tensor, end: Tensor) -> Tensor:
    """``sqrt(start * end)`` as diffusers computes it, ``exp(lerp(log start, log end, 0.5))`` in float32.

    The order of the arguments changes the rounding, so each caller keeps diffusers' order.
    """
    return start.log().lerp(end.log(), 0.5).exp()


def _float32_sigma_to_t(sigmas: Tensor, log_sigmas: np.ndarray) -> np.ndarray:
    """:func:`sigma_to_t` in float32 throughout, as diffusers' KDPM2 runs it on torch tensors."""
    log_sigma = np.log(np.maximum(sigmas.numpy(), np.float32(1e-10)))
    dists = log_sigma[np.newaxis, :] - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx.astype(np.float32) + w * (low_idx + 1).astype(np.float32)


def _float32(value: float) -> Tensor:
    """A float32 0-d tensor: the levels diffusers computes with."""
    return torch.tensor(value, dtype=torch.float32)


def interleave(first: Tensor, second: Tensor) -> Tensor:
    """``[first[0], second[0], first[1], second[1], ...]``: the model calls of two-call steps, in order."""
    return torch.stack((first[:, None], second[:, None]), dim=-1).flatten()


class AbstractKDPM2Scheduler(SigmaRespacingMixin, AbstractKarrasScheduler):
    """The two-call steps of k-diffusion's ``sample_dpm_2``: position ``2k`` calls the model at
    ``sigma_k``, position ``2k + 1`` at the midpoint of the step; the last step is one Euler call to 0.

    ``state.sigmas`` repeats every level after the first twice (and the final 0 three times), as
    diffusers lays them out, so ``add_noise`` at position ``p`` noises to ``state.sigmas[p]``.
    """

    order: ClassVar[int] = 2
    fixed_config: ClassVar[Mapping[str, object]] = {"use_beta_sigmas": False}

    beta_start: float = Field(default=0.00085, gt=0.0, lt=1.0)
    beta_end: float = Field(default=0.012, gt=0.0, lt=1.0)
    beta_schedule: BetaSchedule = "linear"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"

    def _model_schedule(self, num_steps: int) -> tuple[Tensor, Tensor]:
        """The step levels (each after the first twice), and the model timesteps with the midpoints' interleaved."""
        noise = self.training_noise
        timesteps = spaced_timesteps(
            self.timestep_spacing,
            num_steps,
            num_train_timesteps=self.num_train_timesteps,
            steps_offset=self.steps_offset,
            round_linspace=False,
        ).astype(np.float32)
        sigmas = interpolate_sigmas(timesteps, noise.sigmas)
        kind = self._sigma_respacing
        if kind is not None:
            # diffusers keeps these timesteps in float64, Karras ones rounded
            sigmas = respace_sigmas(kind, sigmas, num_steps)
            timesteps = sigma_to_t(sigmas, noise.log_sigmas)
            timesteps = np.round(timesteps) if kind == "karras" else timesteps
        levels = float32_tensor(np.concatenate([sigmas, [0.0]]))
        steps = torch.from_numpy(timesteps)
        # the midpoints of every step but the last, which goes to 0 in one call
        midpoints = self._midpoint(levels[:-2], levels[1:-1])
        midpoints = torch.from_numpy(_float32_sigma_to_t(midpoints, noise.log_sigmas)).to(steps.dtype)
        return (
            torch.cat([steps[:1], interleave(midpoints, steps[1:])]),
            torch.cat([levels[:1], levels[1:].repeat_interleave(2), levels[-1:]]),
        )

    @staticmethod
    def _step_levels(state: SchedulerState, step_index: int) -> tuple[int, float, float]:
        """``(position, sigma_k, sigma_{k+1})``: the levels of the step that position belongs to."""
        j = state.position(step_index)
        start = j - j % 2
        return j, state.full_sigmas[start], state.full_sigmas[start + 1]

    @abstractmethod
    def _midpoint(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        """The level of the second call of the step from ``sigma`` to ``sigma_next`` (float32, elementwise)."""

    def _midpoint_of(self, sigma: float, sigma_next: float) -> float:
        """:meth:`_midpoint` of one step, recomputed from the state's levels as diffusers rounds it."""
        return float(self._midpoint(_float32(sigma), _float32(sigma_next)))

    def scale_model_input(
        self, state: SchedulerState, sample: Float[Tensor, "batch *rest"], step_index: int
    ) -> Float[Tensor, "batch *rest"]:
        """``sample / sqrt(sigma**2 + 1)`` at ``sigma_k``, or at the midpoint for the second call."""
        j, sigma, sigma_next = self._step_levels(state, step_index)
        level = sigma if j % 2 == 0 else self._midpoint_of(sigma, sigma_next)
        return sample / (level**2 + 1) ** 0.5

    def _slope(self, model_output: Tensor, sample: Tensor, sigma: float) -> Tensor:
        """``dx/dsigma = (x - x0) / sigma`` of the probability-flow ODE."""
        x0 = karras_data_prediction(self.prediction_type, model_output, sample, sigma=sigma)
        return (sample - x0) / sigma

    def _half_step(
        self, state: SchedulerState, model_output: Tensor, step_index: int, sample: Tensor, sigma: float, mid: float
    ) -> Tensor:
        """The first call of a step: Euler from ``sigma`` to the midpoint ``mid``, remembering where it started."""
        derivative = self._slope(model_output, sample, sigma)
        state.remember(step_index, StepRecord(derivative, sample), keep=2)
        return sample + derivative * (mid - sigma)


@final
class KDPM2DiscreteScheduler(AbstractKDPM2Scheduler):
    """DPM-Solver-2: Euler to the geometric midpoint of ``sigma_k`` and ``sigma_{k+1}``, then the whole
    step from ``sigma_k`` with the slope found there.

    Implements k-diffusion's ``sample_dpm_2`` (Karras et al., 2022, "Elucidating the Design Space of
    Diffusion-Based Generative Models", Algorithm 2 without churn, with DPM-Solver-2's midpoint, Lu et
    al., 2022). Each step calls the model twice, so ``state.timesteps`` has ``2n - 1`` entries. Fields
    are diffusers' ``KDPM2DiscreteScheduler`` config keys.

    Example:
        >>> s = KDPM2DiscreteScheduler()
        >>> state = s.set_timesteps(3)
        >>> len(state.timesteps), state.timesteps[0].item(), state.timesteps[2].item()
        (5, 999.0, 499.5)
    """

    def _midpoint(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return log_midpoint(sigma_next, sigma)  # 0 when sigma_next is 0

    def step(
        self,
        state: SchedulerState,
        model_output: Float[Tensor, "batch *rest"],
        step_index: int,
        sample: Float[Tensor, "batch *rest"],
        *,
        generator: Generator | None = None,
    ) -> Float[Tensor, "batch *rest"]:
        """Even positions step to the midpoint; odd ones take the whole step with the midpoint's slope."""
        j, sigma, sigma_next = self._step_levels(state, step_index)
        mid = self._midpoint_of(sigma, sigma_next)  # 0 on the last step: a plain Euler step to 0
        if j % 2 == 0:
            return self._half_step(state, model_output, step_index, sample, sigma, mid)
        start = state.recall(step_index - 1, needed_by=step_index)
        return start.sample + self._slope(model_output, sample, mid) * (sigma_next - sigma)


__all__ = ["AbstractKDPM2Scheduler", "KDPM2DiscreteScheduler", "interleave", "log_midpoint"]
