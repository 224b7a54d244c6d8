"""Base of the samplers that solve the variance-exploding ODE/SDE in sigma (Karras et al., 2022).

A discrete-time model trained on ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` is equivalently a
denoiser of ``x = x0 + sigma eps`` with ``sigma = sqrt((1 - abar) / abar)`` whose input is scaled by
``1 / sqrt(sigma**2 + 1)``; Euler, Heun, LMS and their ancestral variants step in that form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float
from pydantic import model_validator
from torch import Tensor
from typing_extensions import Self

from diffblocks.components.schedulers.betas import AbstractDiscreteScheduler, TimestepSpacing
from diffblocks.components.schedulers.schedule import (
    SigmaSpacing,
    interpolate_sigmas,
    karras_init_noise_sigma,
    respace_sigmas,
    sigma_to_t,
    spaced_timesteps,
)
from diffblocks.components.schedulers.state import SchedulerState


class AbstractKarrasScheduler(AbstractDiscreteScheduler):
    """A discrete-beta scheduler that steps in the variance-exploding sigma parameterisation."""

    timestep_spacing: TimestepSpacing = "linspace"

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
        timesteps, levels = self._model_schedule(num_inference_steps)
        return self._build_state(
            timesteps,
            levels,
            num_inference_steps=num_inference_steps,
            strength=strength,
            device=device,
        )

    def _model_schedule(self, num_steps: int) -> tuple[Tensor, Tensor]:
        """Timesteps of the model calls and their sigmas, then the final sigma; here the plain schedule."""
        return self._karras_schedule(num_steps)

    def _karras_schedule(
        self,
        num_steps: int,
        *,
        respace: SigmaSpacing | None = None,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        final_sigma: float = 0.0,
    ) -> tuple[Tensor, Tensor]:
        """Float32 model timesteps and their sigmas, then ``final_sigma``, as diffusers' sigma schedulers build them.

        Timesteps are spaced per ``timestep_spacing`` and their sigmas interpolated from the training
        table; with ``respace`` the sigmas are re-spaced over the same range (Karras et al., 2022,
        Eq. 5, or log-uniform) and the timesteps recovered from them.
        """
        noise = self.training_noise
        timesteps = spaced_timesteps(
            self.timestep_spacing,
            num_steps,
            num_train_timesteps=self.num_train_timesteps,
            steps_offset=self.steps_offset,
            round_linspace=False,
        ).astype(np.float32)
        sigmas = interpolate_sigmas(timesteps, noise.sigmas)
        if respace is not None:
            sigmas = respace_sigmas(respace, sigmas, num_steps, sigma_min=sigma_min, sigma_max=sigma_max)
            timesteps = sigma_to_t(sigmas, noise.log_sigmas)
        return float32_tensor(timesteps), float32_tensor(np.concatenate([sigmas, [final_sigma]]))

    def _init_noise_sigma(self, sigmas: Tensor) -> float:
        """The largest sigma: a variance-exploding sampler starts from pure noise at that level."""
        return karras_init_noise_sigma(sigmas, self.timestep_spacing)

    def scale_model_input(
        self, state: SchedulerState, sample: Float[Tensor, "batch *rest"], step_index: int
    ) -> Float[Tensor, "batch *rest"]:
        """``sample / sqrt(sigma**2 + 1)``: the variance-preserving input the model was trained on."""
        sigma = state.full_sigmas[state.position(step_index)]
        return sample / (sigma**2 + 1) ** 0.5

    def add_noise(
        self,
        state: SchedulerState,
        original: Float[Tensor, "batch *rest"],
        noise: Float[Tensor, "batch *rest"],
        step_index: int,
    ) -> Float[Tensor, "batch *rest"]:
        """``original + sigma * noise`` at the sigma of step ``step_index``."""
        return original + noise * state.full_sigmas[state.position(step_index)]


def respacing(use_karras_sigmas: bool, use_exponential_sigmas: bool) -> SigmaSpacing | None:
    """The sigma re-spacing named by diffusers' boolean config flags."""
    if use_karras_sigmas and use_exponential_sigmas:
        raise ValueError("use_karras_sigmas and use_exponential_sigmas are exclusive; set one.")
    if use_karras_sigmas:
        return "karras"
    return "exponential" if use_exponential_sigmas else None


class SigmaRespacingMixin:
    """The ``use_karras_sigmas``/``use_exponential_sigmas`` keys: checked once, read as one re-spacing.

    The classes using it declare both keys themselves, where diffusers' signature puts them:
    pydantic orders inherited fields first, and :meth:`AbstractScheduler.to_config` writes keys in
    field order. List it first among the bases so that its check runs after the base's.
    """

    if TYPE_CHECKING:
        use_karras_sigmas: bool
        use_exponential_sigmas: bool

    @model_validator(mode="after")
    def _check_respacing(self) -> Self:
        respacing(self.use_karras_sigmas, self.use_exponential_sigmas)
        return self

    @property
    def _sigma_respacing(self) -> SigmaSpacing | None:
        """The re-spacing the two keys name (Karras et al., 2022, Eq. 5, or log-uniform), or None."""
        return respacing(self.use_karras_sigmas, self.use_exponential_sigmas)


def ancestral_sigmas(sigma: float | Tensor, sigma_next: float | Tensor) -> tuple[Tensor, Tensor]:
    """``(sigma_up, sigma_down)`` of an ancestral step: ``sigma_down**2 + sigma_up**2 = sigma_next**2``.

    The deterministic step goes down to ``sigma_down`` and fresh noise of ``sigma_up`` brings the
    marginal back to ``sigma_next`` (k-diffusion's ``get_ancestral_step`` with ``eta = 1``). Float32
    0-d tensors, exactly as diffusers computes them: a step from sigma 4096 (zero terminal SNR)
    lands near 0 after cancelling almost all digits, so their rounding shows in the sample.
    """
    s, s_next = torch.as_tensor(sigma, dtype=torch.float32), torch.as_tensor(sigma_next, dtype=torch.float32)
    sigma_up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
    return sigma_up, (s_next**2 - sigma_up**2) ** 0.5


def float32_tensor(values: np.ndarray) -> Tensor:
    """A float32 CPU tensor of ``values`` (cast in numpy first, as diffusers does)."""
    return torch.from_numpy(np.asarray(values).astype(np.float32))


__all__ = ["AbstractKarrasScheduler", "SigmaRespacingMixin", "ancestral_sigmas", "float32_tensor", "respacing"]
