"""Base of the exponential-integrator solvers (DPM-Solver++, DEIS, UniPC) in log-SNR time.

They solve the diffusion ODE in ``lambda = log(alpha / sigma)`` for a variance-preserving model,
reusing the model outputs of earlier steps; they share the schedule, the conversion of the model
output and the forward noising defined here.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from jaxtyping import Float
from pydantic import Field
from torch import Tensor

from diffblocks.components.schedulers.betas import (
    AbstractBetaScheduler,
    AbstractDiscreteScheduler,
    TimestepSpacing,
    TrainingNoise,
    diffuse,
)
from diffblocks.components.schedulers.karras import SigmaRespacingMixin, float32_tensor
from diffblocks.components.schedulers.prediction import PredictionType, data_prediction, dynamic_threshold
from diffblocks.components.schedulers.schedule import SigmaSpacing, respace_sigmas, sigma_to_t, spaced_timesteps
from diffblocks.components.schedulers.state import SchedulerState

# below this many steps the last steps drop to lower order, which stabilises few-step sampling
_LOWER_ORDER_FINAL_BELOW = 15


def vp_coefficients(sigma: float) -> tuple[float, float]:
    """``(alpha_t, sigma_t)`` of the variance-preserving process whose Karras sigma is ``sigma``."""
    alpha = 1 / math.sqrt(sigma**2 + 1)
    return alpha, sigma * alpha


def half_log_snr(sigma: float) -> float:
    """``lambda = log(alpha_t / sigma_t)``; infinite at the clean end (``sigma = 0``)."""
    alpha, sigma_t = vp_coefficients(sigma)
    return math.log(alpha) - math.log(sigma_t) if sigma_t > 0 else math.inf


def clipped_end(noise: TrainingNoise, lambda_min_clipped: float) -> int:
    """Exclusive end of the training timesteps whose log-SNR is above ``lambda_min_clipped``.

    Steps below it are never visited, which keeps cosine schedules away from their singular end.
    """
    lambdas = torch.log(noise.alphas_cumprod.sqrt()) - torch.log((1 - noise.alphas_cumprod).sqrt())
    return len(lambdas) - int(torch.searchsorted(torch.flip(lambdas, [0]), lambda_min_clipped))


class AbstractLogSNRScheduler(SigmaRespacingMixin, AbstractBetaScheduler):
    """An exponential-integrator solver in log-SNR time on a discrete beta schedule.

    Holds the config keys that DPM-Solver (multistep and single-step), DEIS and UniPC share, the
    schedule's assembly, the conversion of the model output and the forward noising.
    """

    terminal_abar: ClassVar[float | None] = 2.0**-24

    solver_order: int = Field(default=2, ge=1, le=3)
    prediction_type: PredictionType = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = Field(default=0.995, gt=0.0, lt=1.0)
    sample_max_value: float = Field(default=1.0, gt=0.0)
    lower_order_final: bool = True
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False

    def set_timesteps(
        self,
        num_inference_steps: int,
        *,
        device: torch.device | str | None = None,
        strength: float = 1.0,
        mu: float | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> SchedulerState:
        self._check_request(num_inference_steps, limit=self.num_train_timesteps, mu=mu, sigmas=sigmas)
        timesteps, levels, final = self._schedule(num_inference_steps)
        return self._build_state(
            int_timesteps(timesteps),
            float32_tensor(np.concatenate([levels, [final]])),
            num_inference_steps=num_inference_steps,
            strength=strength,
            device=device,
        )

    @abstractmethod
    def _schedule(self, num_steps: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Model timesteps (fractional ones are truncated), their sigmas, and the final level."""

    def _respaced(
        self, kind: SigmaSpacing, num_steps: int, *, sigma_min: float | None = None, sigma_max: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Karras or exponential levels over the training range, and their timesteps (Karras ones rounded)."""
        noise = self.training_noise
        levels = respace_sigmas(kind, noise.sigmas[::-1], num_steps, sigma_min=sigma_min, sigma_max=sigma_max)
        timesteps = sigma_to_t(levels, noise.log_sigmas)
        return (np.round(timesteps) if kind == "karras" else timesteps), levels

    def _data_prediction(
        self, model_output: Float[Tensor, "batch *rest"], sample: Float[Tensor, "batch *rest"], sigma: float
    ) -> Float[Tensor, "batch *rest"]:
        """The model's estimate of ``x0`` at noise level ``sigma``, thresholded if configured."""
        alpha_t, sigma_t = vp_coefficients(sigma)
        x0 = data_prediction(self.prediction_type, model_output, sample, alpha=alpha_t, sigma=sigma_t)
        if self.thresholding:
            x0 = dynamic_threshold(x0, ratio=self.dynamic_thresholding_ratio, max_value=self.sample_max_value)
        return x0

    def add_noise(
        self,
        state: SchedulerState,
        original: Float[Tensor, "batch *rest"],
        noise: Float[Tensor, "batch *rest"],
        step_index: int,
    ) -> Float[Tensor, "batch *rest"]:
        alpha_t, sigma_t = vp_coefficients(state.full_sigmas[state.position(step_index)])
        return diffuse(original, noise, alpha=alpha_t, sigma=sigma_t)


class AbstractMultistepScheduler(AbstractLogSNRScheduler, AbstractDiscreteScheduler):
    """A multistep solver (DPM-Solver++, DEIS, UniPC): spaced timesteps, and the data of earlier steps reused."""

    timestep_spacing: TimestepSpacing = "linspace"

    def _spaced_timesteps(self, num_steps: int, *, end: int | None = None) -> np.ndarray:
        """Descending timesteps; ``linspace``/``leading`` space ``num_steps + 1`` points and drop 0's end."""
        trailing = self.timestep_spacing == "trailing"
        timesteps = spaced_timesteps(
            self.timestep_spacing,
            num_steps if trailing else num_steps + 1,
            num_train_timesteps=self.num_train_timesteps,
            steps_offset=self.steps_offset,
            end=end,
        )
        return timesteps if trailing else timesteps[:-1]

    def _order_at(self, state: SchedulerState, step_index: int) -> int:
        """Warm up from first order; with ``lower_order_final`` and few steps, end with orders 2 then 1."""
        steps = len(state.full_timesteps)
        j = state.position(step_index)
        few = self.lower_order_final and steps < _LOWER_ORDER_FINAL_BELOW
        if j == steps - 1 and (few or self._first_order_at_end()):
            return 1
        if j == steps - 2 and few:
            return min(self.solver_order, step_index + 1, 2)
        return min(self.solver_order, step_index + 1)

    def _first_order_at_end(self) -> bool:
        """Whether the last step is first order whatever the step count."""
        return False


def int_timesteps(values: np.ndarray) -> Tensor:
    """Timesteps as int64, truncating fractional ones as diffusers' ``.to(torch.int64)`` does."""
    return torch.from_numpy(np.asarray(values)).to(torch.int64)


__all__ = [
    "AbstractLogSNRScheduler",
    "AbstractMultistepScheduler",
    "clipped_end",
    "half_log_snr",
    "int_timesteps",
    "vp_coefficients",
]
