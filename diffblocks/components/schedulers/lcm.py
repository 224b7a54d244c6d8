"""Latent consistency model sampling (Luo et al., 2023)."""

from __future__ import annotations

import math
from typing import final

from jaxtyping import Float
from torch import Tensor

from diffblocks.components.noise import Generator, randn_tensor
from diffblocks.components.schedulers.consistency import AbstractConsistencyScheduler
from diffblocks.components.schedulers.prediction import data_prediction, dynamic_threshold
from diffblocks.components.schedulers.state import SchedulerState

_SIGMA_DATA = 0.5  # the data scale of the consistency parameterisation (Song et al., 2023)


@final
class LCMScheduler(AbstractConsistencyScheduler):
    """Multistep consistency sampling: jump to the clean estimate, then re-noise to the next timestep.

    Implements Algorithm 1 of Luo et al. (2023), "Latent Consistency Models: Synthesizing
    High-Resolution Images with Few-Step Inference": the consistency function
    ``f(x, t) = c_skip(t) x + c_out(t) x0(x, t)`` maps the sample to a clean latent, which is noised
    with fresh noise to the next timestep of the skipping schedule (the last step returns it).
    ``c_skip`` and ``c_out`` are the boundary conditions of Song et al. (2023), on the timestep
    scaled by ``timestep_scaling``. Fields are diffusers' ``LCMScheduler`` config keys.

    Example:
        >>> s = LCMScheduler()
        >>> s.set_timesteps(4).timesteps.tolist()
        [999, 759, 499, 259]
    """

    def step(
        self,
        state: SchedulerState,
        model_output: Float[Tensor, "batch *rest"],
        step_index: int,
        sample: Float[Tensor, "batch *rest"],
        *,
        generator: Generator | None = None,
    ) -> Float[Tensor, "batch *rest"]:
        """``f(x, t)`` at the last step, else ``sqrt(abar_next) f(x, t) + sqrt(1 - abar_next) z``."""
        j = state.position(step_index)
        t = int(state.full_timesteps[j])
        abar = self.training_noise.abar
        x0 = data_prediction(
            self.prediction_type, model_output, sample, alpha=math.sqrt(abar[t]), sigma=math.sqrt(1 - abar[t])
        )
        if self.thresholding:
            x0 = dynamic_threshold(x0, ratio=self.dynamic_thresholding_ratio, max_value=self.sample_max_value)
        elif self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        c_skip, c_out = self.boundary_scalings(t)
        denoised = c_out * x0 + c_skip * sample
        if j == len(state.full_timesteps) - 1:
            return denoised
        abar_next = abar[int(state.full_timesteps[j + 1])]
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=denoised.dtype)
        return math.sqrt(abar_next) * denoised + math.sqrt(1 - abar_next) * noise

    def boundary_scalings(self, timestep: int) -> tuple[float, float]:
        """``(c_skip, c_out)`` at ``timestep``: ``f`` is the identity at ``t = 0`` (Song et al., 2023)."""
        scaled = timestep * self.timestep_scaling
        c_skip = _SIGMA_DATA**2 / (scaled**2 + _SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + _SIGMA_DATA**2) ** 0.5
        return c_skip, c_out


__all__ = ["LCMScheduler"]
