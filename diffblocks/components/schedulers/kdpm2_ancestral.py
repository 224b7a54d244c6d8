"""Ancestral DPM-Solver-2 in sigma: the two-call step to ``sigma_down``, then fresh noise (k-diffusion)."""

from __future__ import annotations

from typing import final

import torch
from jaxtyping import Float
from torch import Tensor

from diffblocks.components.noise import Generator, randn_tensor
from diffblocks.components.schedulers.karras import ancestral_sigmas
from diffblocks.components.schedulers.kdpm2 import AbstractKDPM2Scheduler, log_midpoint
from diffblocks.components.schedulers.state import SchedulerState


@final
class KDPM2AncestralDiscreteScheduler(AbstractKDPM2Scheduler):
    """DPM-Solver-2 down to ``sigma_down``, then ``sigma_up`` of fresh noise back up to ``sigma_{k+1}``.

    Implements k-diffusion's ``sample_dpm_2_ancestral``: ``sigma_{k+1}**2 = sigma_down**2 +
    sigma_up**2`` splits each step (Karras et al., 2022, ancestral sampling with ``eta = 1``); the
    deterministic part is :class:`~diffblocks.components.schedulers.kdpm2.KDPM2DiscreteScheduler`'s
    midpoint step, aimed at ``sigma_down``. The last step is one Euler call to 0, without noise.
    Fields are diffusers' ``KDPM2AncestralDiscreteScheduler`` config keys.

    Example:
        >>> s = KDPM2AncestralDiscreteScheduler(beta_schedule="scaled_linear")
        >>> state = s.set_timesteps(10)
        >>> len(state.timesteps), round(state.init_noise_sigma, 3)
        (19, 14.615)
    """

    def _midpoint(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        # the midpoint is taken towards sigma_down; the last step (to 0) has none
        mid = log_midpoint(sigma, ancestral_sigmas(sigma, sigma_next)[1])
        return torch.where(sigma_next > 0, mid, 0.0)

    def step(
        self,
        state: SchedulerState,
        model_output: Float[Tensor, "batch *rest"],
        step_index: int,
        sample: Float[Tensor, "batch *rest"],
        *,
        generator: Generator | None = None,
    ) -> Float[Tensor, "batch *rest"]:
        """Even positions step to the midpoint; odd ones step to ``sigma_down`` and add ``sigma_up`` of noise."""
        j, sigma, sigma_next = self._step_levels(state, step_index)
        mid = self._midpoint_of(sigma, sigma_next)
        if j % 2 == 0:
            return self._half_step(state, model_output, step_index, sample, sigma, mid)
        start = state.recall(step_index - 1, needed_by=step_index)
        sigma_up, sigma_down = (float(level) for level in ancestral_sigmas(sigma, sigma_next))
        prev_sample = start.sample + self._slope(model_output, sample, mid) * (sigma_down - sigma)
        noise = randn_tensor(
            model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
        )
        return prev_sample + noise * sigma_up


__all__ = ["KDPM2AncestralDiscreteScheduler"]
