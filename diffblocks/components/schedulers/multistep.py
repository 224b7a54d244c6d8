"""Base of the exponential-integrator multistep solvers (DPM-Solver++, UniPC) in log-SNR time.

Both solve the diffusion ODE in ``lambda = log(alpha / sigma)`` for a variance-preserving model,
reusing the data predictions of earlier steps; they share the schedule, the conversion of the
model output and the forward noising defined here.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
import torch
from jaxtyping import Float
from pydantic import Field
from torch import Tensor

from diffblocks.components.schedulers.betas import AbstractDiscreteScheduler, TimestepSpacing, diffuse
from diffblocks.components.schedulers.karras import SigmaRespacingMixin, float32_tensor
from diffblocks.components.schedulers.prediction import PredictionType, data_prediction, dynamic_threshold
from diffblocks.components.schedulers.schedule import spaced_timesteps
from diffblocks.components.schedulers.state import SchedulerState


def vp_coefficients(sigma: float) -> tuple[float, float]:
    """``(alpha_t, sigma_t)`` of the variance-preserving process whose Karras sigma is ``sigma``."""
    alpha = 1 / math.sqrt(sigma**2 + 1)
    return alpha, sigma * alpha


def half_log_snr(sigma: float) -> float:
    """``lambda = log(alpha_t / sigma_t)``; infinite at the clean end (``sigma = 0``)."""
    alpha, sigma_t = vp_coefficients(sigma)
    return math.log(alpha) - math.log(sigma_t) if sigma_t > 0 else math.inf


class AbstractMultistepScheduler(SigmaRespacingMixin, AbstractDiscreteScheduler):
    """A multistep solver in log-SNR time on a discrete beta schedule."""

    terminal_abar: ClassVar[float | None] = 2.0**-24

    solver_order: int = Field(default=2, ge=1, le=3)
    prediction_type: PredictionType = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = Field(default=0.995, gt=0.0, lt=1.0)
    sample_max_value: float = Field(default=1.0, gt=0.0)
    lower_order_final: bool = True
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"
    timestep_spacing: TimestepSpacing = "linspace"
    rescale_betas_zero_snr: bool = False

    def _zero_terminal_snr(self) -> bool:
        return self.rescale_betas_zero_snr

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
        timesteps, levels, lowest = self._schedule(num_inference_steps)
        final = lowest if self.final_sigmas_type == "sigma_min" else 0.0
        return self._build_state(
            int_timesteps(timesteps),
            float32_tensor(np.concatenate([levels, [final]])),
            num_inference_steps=num_inference_steps,
            strength=strength,
            device=device,
        )

    @abstractmethod
    def _schedule(self, num_steps: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Model timesteps (fractional ones are truncated), their sigmas, and the lowest level.

        The lowest level ends the schedule with ``final_sigmas_type="sigma_min"``; otherwise it ends at 0.
        """

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


def int_timesteps(values: np.ndarray) -> Tensor:
    """Timesteps as int64, truncating fractional ones as diffusers' ``.to(torch.int64)`` does."""
    return torch.from_numpy(np.asarray(values)).to(torch.int64)


__all__ = ["AbstractMultistepScheduler", "half_log_snr", "int_timesteps", "vp_coefficients"]
