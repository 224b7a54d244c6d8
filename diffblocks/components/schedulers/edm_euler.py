"""Euler's method on the probability-flow ODE of an EDM-preconditioned model (Karras et al., 2022)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, final

import torch
from jaxtyping import Float
from pydantic import Field, model_validator
from torch import Tensor
from typing_extensions import Self

from diffblocks.components.noise import Generator
from diffblocks.components.schedulers.base import MAX_TRAIN_TIMESTEPS, AbstractScheduler
from diffblocks.components.schedulers.state import SchedulerState


@final
class EDMEulerScheduler(AbstractScheduler):
    """Deterministic Euler steps on sigmas from ``sigma_max`` to ``sigma_min``, for a model wrapped in
    EDM's preconditioning.

    Implements Algorithm 2 of Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based
    Generative Models", without churn, with the preconditioning of their Table 1: the model sees
    ``c_in x`` at time ``c_noise = log(sigma) / 4`` (the values of ``state.timesteps``), and
    ``x0 = c_skip x + c_out F``. Sigmas are spaced by Eq. 5 (``rho``) or log-uniformly. Fields are
    diffusers' ``EDMEulerScheduler`` config keys (CosXL and other EDM checkpoints ship one).

    Example:
        >>> s = EDMEulerScheduler()
        >>> state = s.set_timesteps(4)
        >>> [round(x, 3) for x in state.sigmas.tolist()]
        [80.0, 9.723, 0.47, 0.002, 0.0]
    """

    sigma_min: float = Field(default=0.002, gt=0.0)
    sigma_max: float = Field(default=80.0, gt=0.0)
    sigma_data: float = Field(default=0.5, gt=0.0)
    sigma_schedule: Literal["karras", "exponential"] = "karras"
    # read and written for config fidelity: sampling never reads the training schedule
    num_train_timesteps: int = Field(default=1000, ge=1, le=MAX_TRAIN_TIMESTEPS)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    rho: float = Field(default=7.0, gt=0.0)
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"

    @model_validator(mode="after")
    def _check_range(self) -> Self:
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min {self.sigma_min} must be below sigma_max {self.sigma_max}.")
        return self

    def set_timesteps(
        self,
        num_inference_steps: int,
        *,
        device: torch.device | str | None = None,
        strength: float = 1.0,
        mu: float | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> SchedulerState:
        """``num_inference_steps`` sigmas from ``sigma_max`` to ``sigma_min``, then the final level."""
        self._check_request(num_inference_steps, mu=mu, sigmas=sigmas)
        levels = self._sigmas(num_inference_steps)
        final = levels[-1:] if self.final_sigmas_type == "sigma_min" else torch.zeros(1)
        return self._build_state(
            0.25 * levels.log(),  # c_noise
            torch.cat([levels, final]),
            num_inference_steps=num_inference_steps,
            strength=strength,
            device=device,
        )

    def _sigmas(self, num_steps: int) -> Tensor:
        """Float32 levels, computed in float64 as diffusers does (the log-uniform ones in float32)."""
        if self.sigma_schedule == "exponential":
            return torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), num_steps).exp().flip(0)
        # Karras et al. (2022), Eq. 5: evenly spaced in sigma ** (1 / rho)
        ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
        low, high = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return ((high + ramp * (low - high)) ** self.rho).to(torch.float32)

    def _init_noise_sigma(self, sigmas: Tensor) -> float:
        """``sqrt(sigma_max**2 + 1)`` whatever the schedule, as diffusers scales the initial noise."""
        return (self.sigma_max**2 + 1) ** 0.5

    def scale_model_input(
        self, state: SchedulerState, sample: Float[Tensor, "batch *rest"], step_index: int
    ) -> Float[Tensor, "batch *rest"]:
        """``c_in x = x / sqrt(sigma**2 + sigma_data**2)``: unit variance at every level."""
        sigma = torch.tensor(state.full_sigmas[state.position(step_index)], dtype=torch.float32)
        return sample * (1 / (sigma**2 + self.sigma_data**2) ** 0.5)

    def step(
        self,
        state: SchedulerState,
        model_output: Float[Tensor, "batch *rest"],
        step_index: int,
        sample: Float[Tensor, "batch *rest"],
        *,
        generator: Generator | None = None,
    ) -> Float[Tensor, "batch *rest"]:
        """One Euler step of ``dx/dsigma = (x - x0) / sigma`` with EDM's denoiser ``x0``."""
        j = state.position(step_index)
        # float32 0-d levels, as diffusers (and scale_model_input): a one-step run from sigma_max
        # cancels almost every digit, so the rounding of the coefficients shows in the sample
        sigma, sigma_next = (torch.tensor(state.full_sigmas[k], dtype=torch.float32) for k in (j, j + 1))
        sample = sample.to(torch.float32)
        derivative = (sample - self._denoised(model_output, sample, sigma)) / sigma
        return (sample + derivative * (sigma_next - sigma)).to(model_output.dtype)

    def _denoised(self, model_output: Tensor, sample: Tensor, sigma: Tensor) -> Tensor:
        """``x0 = c_skip x + c_out F`` (Karras et al., 2022, Table 1); ``v_prediction`` flips ``c_out``."""
        c_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        c_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2) ** 0.5
        return c_skip * sample + (c_out if self.prediction_type == "epsilon" else -c_out) * model_output

    def add_noise(
        self,
        state: SchedulerState,
        original: Float[Tensor, "batch *rest"],
        noise: Float[Tensor, "batch *rest"],
        step_index: int,
    ) -> Float[Tensor, "batch *rest"]:
        """``original + sigma * noise`` at the sigma of step ``step_index``."""
        return original + noise * state.full_sigmas[state.position(step_index)]


__all__ = ["EDMEulerScheduler"]
