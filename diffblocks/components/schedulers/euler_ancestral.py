"""Ancestral Euler sampling of the variance-exploding SDE (Karras et al., 2022; k-diffusion)."""

from __future__ import annotations

from typing import ClassVar, Literal, final

import torch
from jaxtyping import Float
from torch import Tensor

from diffblocks.components.noise import Generator, randn_tensor
from diffblocks.components.schedulers.karras import AbstractKarrasScheduler, ancestral_sigmas
from diffblocks.components.schedulers.prediction import karras_data_prediction
from diffblocks.components.schedulers.state import SchedulerState


def _split_noise(sigma: float, sigma_next: float) -> tuple[float, float]:
    """``(sigma_up, dt)``: the fresh noise, and the Euler step ``sigma_down - sigma`` in float32, as diffusers."""
    sigma_up, sigma_down = ancestral_sigmas(sigma, sigma_next)
    return float(sigma_up), float(sigma_down - torch.tensor(sigma, dtype=torch.float32))


@final
class EulerAncestralDiscreteScheduler(AbstractKarrasScheduler):
    """Euler step down to ``sigma_down``, then fresh noise up to ``sigma_next``.

    The step splits ``sigma_next**2 = sigma_down**2 + sigma_up**2`` so that the added noise
    ``sigma_up`` makes the marginal exact (ancestral sampling, as in k-diffusion's
    ``sample_euler_ancestral``, on the ODE of Karras et al., 2022). Fields are diffusers'
    ``EulerAncestralDiscreteScheduler`` config keys.

    Example:
        >>> s = EulerAncestralDiscreteScheduler()
        >>> state = s.set_timesteps(3)
        >>> state.timesteps.tolist()
        [999.0, 499.5, 0.0]
    """

    terminal_abar: ClassVar[float | None] = 2.0**-24

    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    rescale_betas_zero_snr: bool = False

    def _zero_terminal_snr(self) -> bool:
        return self.rescale_betas_zero_snr

    def step(
        self,
        state: SchedulerState,
        model_output: Float[Tensor, "batch *rest"],
        step_index: int,
        sample: Float[Tensor, "batch *rest"],
        *,
        generator: Generator | None = None,
    ) -> Float[Tensor, "batch *rest"]:
        """Deterministic Euler step to ``sigma_down`` plus ``sigma_up`` of fresh noise."""
        j = state.position(step_index)
        sigma, sigma_next = state.full_sigmas[j], state.full_sigmas[j + 1]
        sample = sample.to(torch.float32)
        x0 = karras_data_prediction(self.prediction_type, model_output, sample, sigma=sigma)
        sigma_up, dt = _split_noise(sigma, sigma_next)
        derivative = (sample - x0) / sigma
        prev_sample = sample + derivative * dt
        # drawn at every step, the last included (sigma_up = 0), to consume the generator as diffusers does
        noise = randn_tensor(
            model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
        )
        prev_sample = prev_sample + noise * sigma_up
        return prev_sample.to(model_output.dtype)


__all__ = ["EulerAncestralDiscreteScheduler"]
