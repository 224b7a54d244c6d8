"""Base of the samplers that step in alpha-bar on integer training timesteps (DDPM, DDIM, PNDM).

They visit a sub-sequence of the training timesteps and read ``abar_t`` from the training table
itself, so their state has no sigma schedule and the initial noise is unscaled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from diffblocks.components.schedulers.betas import AbstractDiscreteScheduler, TimestepSpacing, diffuse
from diffblocks.components.schedulers.schedule import spaced_timesteps
from diffblocks.components.schedulers.state import SchedulerState


class AbstractAlphaBarScheduler(AbstractDiscreteScheduler):
    """A discrete-beta scheduler whose steps read alpha-bar at integer timesteps; ``state.sigmas`` is None."""

    timestep_spacing: TimestepSpacing = "leading"

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
        timesteps = self._model_timesteps(num_inference_steps, strength=strength)
        return self._build_state(
            torch.from_numpy(timesteps.astype("int64")),
            None,
            num_inference_steps=num_inference_steps,
            strength=strength,
            device=device,
        )

    def _model_timesteps(self, num_inference_steps: int, *, strength: float) -> np.ndarray:
        """The timesteps of the model calls, descending: one per step, spaced per ``timestep_spacing``."""
        return spaced_timesteps(
            self.timestep_spacing,
            num_inference_steps,
            num_train_timesteps=self.num_train_timesteps,
            steps_offset=self.steps_offset,
        )

    def add_noise(
        self,
        state: SchedulerState,
        original: Float[Tensor, "batch *rest"],
        noise: Float[Tensor, "batch *rest"],
        step_index: int,
    ) -> Float[Tensor, "batch *rest"]:
        abar_t = self.training_noise.abar[int(state.full_timesteps[state.position(step_index)])]
        return diffuse(original, noise, alpha=math.sqrt(abar_t), sigma=math.sqrt(1 - abar_t))


__all__ = ["AbstractAlphaBarScheduler"]
