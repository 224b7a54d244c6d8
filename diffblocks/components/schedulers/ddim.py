"""DDIM sampling (Song et al., 2020)."""

from __future__ import annotations

import math
from typing import ClassVar, final

from jaxtyping import Float
from pydantic import Field
from torch import Tensor

from diffblocks.components.noise import Generator, randn_tensor
from diffblocks.components.schedulers.alpha_bar import AbstractAlphaBarScheduler
from diffblocks.components.schedulers.prediction import (
    PredictionType,
    data_prediction,
    dynamic_threshold,
    noise_prediction,
)
from diffblocks.components.schedulers.state import SchedulerState


@final
class DDIMScheduler(AbstractAlphaBarScheduler):
    """Denoising diffusion implicit models: the non-Markovian sampler of Song et al. (2020), Eq. 12.

    Fields are diffusers' ``DDIMScheduler`` config keys, plus ``eta``: the stochasticity of
    Eq. 16 (0 is deterministic DDIM, 1 is DDPM-like). diffusers takes ``eta`` per pipeline call;
    here it is part of the scheduler and written to the config only when set.

    Example:
        >>> s = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
        >>> s.set_timesteps(4).timesteps.tolist()
        [751, 501, 251, 1]
    """

    extension_keys: ClassVar[frozenset[str]] = frozenset({"eta"})

    clip_sample: bool = True
    set_alpha_to_one: bool = True
    prediction_type: PredictionType = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = Field(default=0.995, gt=0.0, lt=1.0)
    clip_sample_range: float = Field(default=1.0, gt=0.0)
    sample_max_value: float = Field(default=1.0, gt=0.0)
    rescale_betas_zero_snr: bool = False
    eta: float = Field(default=0.0, ge=0.0)

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
        """``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z`` (Song et al., 2020, Eq. 12)."""
        t = int(state.full_timesteps[state.position(step_index)])
        # the previous timestep is one stride back, whatever the spacing (diffusers' convention)
        prev_t = t - self.num_train_timesteps // state.num_inference_steps
        abar = self.training_noise.abar
        abar_t = abar[t]
        abar_prev = abar[prev_t] if prev_t >= 0 else self._final_abar()
        alpha_t, sigma_t = math.sqrt(abar_t), math.sqrt(1 - abar_t)

        x0 = data_prediction(self.prediction_type, model_output, sample, alpha=alpha_t, sigma=sigma_t)
        eps = noise_prediction(self.prediction_type, model_output, sample, alpha=alpha_t, sigma=sigma_t)
        if self.thresholding:
            x0 = dynamic_threshold(x0, ratio=self.dynamic_thresholding_ratio, max_value=self.sample_max_value)
        elif self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)

        variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        std = self.eta * math.sqrt(variance)
        prev_sample = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev - std**2) * eps
        if self.eta > 0:
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            prev_sample = prev_sample + std * noise
        return prev_sample

    def _final_abar(self) -> float:
        """Alpha-bar after the last step: 1 (fully clean) or that of timestep 0 (SD's configs)."""
        return 1.0 if self.set_alpha_to_one else self.training_noise.abar[0]


__all__ = ["DDIMScheduler"]
