"""Trajectory consistency distillation sampling (Zheng et al., 2024)."""

from __future__ import annotations

import math
from typing import ClassVar, final

import torch
from jaxtyping import Float
from pydantic import Field
from torch import Tensor

from diffblocks.components.noise import Generator, randn_tensor
from diffblocks.components.schedulers.consistency import AbstractConsistencyScheduler
from diffblocks.components.schedulers.prediction import data_prediction, noise_prediction
from diffblocks.components.schedulers.state import SchedulerState


@final
class TCDScheduler(AbstractConsistencyScheduler):
    """Strategic stochastic sampling: a DDIM jump past the next timestep, then forward noise back up to it.

    Implements the strategic stochastic sampling of Zheng et al. (2024), "Trajectory Consistency
    Distillation: Improved Latent Consistency Distillation by Semi-Linear Consistency Function with
    Trajectory Mapping": from ``t`` the sample jumps deterministically (DDIM, with the model's ``x0`` and ``eps``) to
    ``s = floor((1 - eta) * t_next)``, then is noised forward from ``s`` to ``t_next`` with fresh
    noise. ``eta`` (the paper's gamma) sets the stochasticity: 0 is deterministic, 1 jumps to the
    clean estimate as LCM does.

    Fields are diffusers' ``TCDScheduler`` config keys, plus ``eta``: diffusers takes it per
    ``step`` call (default 0.3, the paper's choice), here it is part of the scheduler and written
    to the config only when set. diffusers' TCD step ignores ``clip_sample`` and
    ``thresholding``; so does this one.

    Example:
        >>> s = TCDScheduler(eta=0.0)
        >>> s.set_timesteps(4).timesteps.tolist()
        [999, 759, 499, 259]
    """

    extension_keys: ClassVar[frozenset[str]] = frozenset({"eta"})

    eta: float = Field(default=0.3, ge=0.0, le=1.0)

    def step(
        self,
        state: SchedulerState,
        model_output: Float[Tensor, "batch *rest"],
        step_index: int,
        sample: Float[Tensor, "batch *rest"],
        *,
        generator: Generator | None = None,
    ) -> Float[Tensor, "batch *rest"]:
        """``x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps``, then noised from ``s`` to ``t_next``."""
        j = state.position(step_index)
        last = j == len(state.full_timesteps) - 1
        t, t_next = int(state.full_timesteps[j]), 0 if last else int(state.full_timesteps[j + 1])
        # floored in float32, as diffusers computes it, so that s lands on the same integer
        s = int(torch.floor((1 - self.eta) * torch.tensor(t_next)))
        abar = self.training_noise.abar
        alpha_t, sigma_t = math.sqrt(abar[t]), math.sqrt(1 - abar[t])
        x0 = data_prediction(self.prediction_type, model_output, sample, alpha=alpha_t, sigma=sigma_t)
        eps = noise_prediction(self.prediction_type, model_output, sample, alpha=alpha_t, sigma=sigma_t)
        noised = math.sqrt(abar[s]) * x0 + math.sqrt(1 - abar[s]) * eps
        if self.eta == 0 or last:
            return noised
        ratio = abar[t_next] / abar[s]
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=noised.dtype)
        return math.sqrt(ratio) * noised + math.sqrt(1 - ratio) * noise


__all__ = ["TCDScheduler"]
