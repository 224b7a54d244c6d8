"""DDPM ancestral sampling (Ho et al., 2020)."""

from __future__ import annotations

import math
from typing import ClassVar, Literal, final

import torch
from jaxtyping import Float
from pydantic import Field
from torch import Tensor

from diffblocks.components.noise import Generator, randn_tensor
from diffblocks.components.schedulers.alpha_bar import AbstractAlphaBarScheduler
from diffblocks.components.schedulers.prediction import PredictionType, data_prediction, dynamic_threshold
from diffblocks.components.schedulers.state import SchedulerState

VarianceType = Literal["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"]


@final
class DDPMScheduler(AbstractAlphaBarScheduler):
    """Denoising diffusion probabilistic models: sample the Gaussian posterior ``q(x_prev | x_t, x0)``.

    Implements Algorithm 2 of Ho et al. (2020), "Denoising Diffusion Probabilistic Models", on any
    sub-sequence of the training timesteps. Fields are diffusers' ``DDPMScheduler`` config keys.

    Example:
        >>> s = DDPMScheduler(num_train_timesteps=1000)
        >>> state = s.set_timesteps(4)
        >>> state.timesteps.tolist()
        [750, 500, 250, 0]
    """

    beta_schedules: ClassVar[frozenset[str]] = frozenset(
        {"linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"}
    )

    variance_type: VarianceType = "fixed_small"
    clip_sample: bool = True
    prediction_type: PredictionType = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = Field(default=0.995, gt=0.0, lt=1.0)
    clip_sample_range: float = Field(default=1.0, gt=0.0)
    sample_max_value: float = Field(default=1.0, gt=0.0)
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
        """Draw ``x_prev ~ N(mean(x_t, x0), var)`` (Ho et al., 2020, Eqs. 6-7).

        With a ``learned``/``learned_range`` variance the model output carries twice the sample's
        channels: the noise prediction, then the variance (Nichol & Dhariwal, 2021).
        """
        j = state.position(step_index)
        t = int(state.full_timesteps[j])
        prev_t = int(state.full_timesteps[j + 1]) if j + 1 < len(state.full_timesteps) else -1
        predicted_variance = None
        if self.variance_type in ("learned", "learned_range"):
            if model_output.shape[1] != 2 * sample.shape[1]:
                raise ValueError(
                    f"variance_type {self.variance_type!r} needs a model output with 2 x {sample.shape[1]} "
                    f"channels (noise, variance), got {model_output.shape[1]}."
                )
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)

        abar = self.training_noise.abar
        abar_t, abar_prev = abar[t], abar[prev_t] if prev_t >= 0 else 1.0
        beta_t = 1 - abar_t / abar_prev
        x0 = data_prediction(
            self.prediction_type, model_output, sample, alpha=math.sqrt(abar_t), sigma=math.sqrt(1 - abar_t)
        )
        if self.thresholding:
            x0 = dynamic_threshold(x0, ratio=self.dynamic_thresholding_ratio, max_value=self.sample_max_value)
        elif self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)

        # posterior mean, Eq. 7: a blend of the x0 estimate and the current sample
        x0_coeff = math.sqrt(abar_prev) * beta_t / (1 - abar_t)
        sample_coeff = math.sqrt(1 - beta_t) * (1 - abar_prev) / (1 - abar_t)
        prev_sample = x0_coeff * x0 + sample_coeff * sample
        if t > 0:
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            prev_sample = prev_sample + self._noise_scale(abar_t, abar_prev, predicted_variance) * noise
        return prev_sample

    def _noise_scale(self, abar_t: float, abar_prev: float, predicted: Tensor | None) -> float | Tensor:
        """Standard deviation of the posterior: fixed (Ho et al.) or learned (Nichol & Dhariwal, 2021)."""
        beta_t = 1 - abar_t / abar_prev
        posterior_var = max((1 - abar_prev) / (1 - abar_t) * beta_t, 1e-20)
        if self.variance_type == "fixed_large":
            return math.sqrt(beta_t)
        if self.variance_type == "learned":
            assert predicted is not None
            return predicted**0.5
        if self.variance_type == "learned_range":
            assert predicted is not None
            frac = (predicted + 1) / 2
            log_var = frac * math.log(beta_t) + (1 - frac) * math.log(posterior_var)
            return torch.exp(0.5 * log_var)
        return math.sqrt(posterior_var)


__all__ = ["DDPMScheduler", "VarianceType"]
