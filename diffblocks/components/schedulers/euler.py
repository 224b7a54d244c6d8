"""Euler's method on the probability-flow ODE (Karras et al., 2022)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal, final

import numpy as np
import torch
from jaxtyping import Float
from pydantic import Field
from torch import Tensor

from diffblocks.components.noise import Generator
from diffblocks.components.schedulers.karras import AbstractKarrasScheduler, SigmaRespacingMixin, float32_tensor
from diffblocks.components.schedulers.prediction import PredictionType, karras_data_prediction
from diffblocks.components.schedulers.schedule import sigma_to_t
from diffblocks.components.schedulers.state import SchedulerState


@final
class EulerDiscreteScheduler(SigmaRespacingMixin, AbstractKarrasScheduler):
    """Deterministic Euler steps ``x += (x - x0) / sigma * (sigma_next - sigma)``.

    Implements Algorithm 2 of Karras et al. (2022), "Elucidating the Design Space of
    Diffusion-Based Generative Models", without churn. Fields are diffusers'
    ``EulerDiscreteScheduler`` config keys; ``set_timesteps`` also takes custom ``sigmas``
    (``num_inference_steps + 1`` values, the last being the final level).

    Example:
        >>> s = EulerDiscreteScheduler(use_karras_sigmas=True)
        >>> state = s.set_timesteps(10)
        >>> len(state.timesteps), len(state.sigmas), state.sigmas[-1].item()
        (10, 11, 0.0)
    """

    fixed_config: ClassVar[Mapping[str, object]] = {"interpolation_type": "linear", "use_beta_sigmas": False}

    prediction_type: PredictionType = "epsilon"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    sigma_min: float | None = Field(default=None, gt=0.0)
    sigma_max: float | None = Field(default=None, gt=0.0)
    timestep_type: Literal["discrete", "continuous"] = "discrete"
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"

    terminal_abar: ClassVar[float | None] = 2.0**-24

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
        """The Karras schedule (re-spaced if configured), or custom ``sigmas`` ending with the final level."""
        self._check_request(num_inference_steps, limit=self.num_train_timesteps, mu=mu)
        if sigmas is not None:
            if len(sigmas) != num_inference_steps + 1:
                raise ValueError(
                    f"custom sigmas need num_inference_steps + 1 = {num_inference_steps + 1} values "
                    f"(the last is the final level), got {len(sigmas)}."
                )
            levels = float32_tensor(np.array(sigmas))
            timesteps = float32_tensor(sigma_to_t(levels[:-1].numpy(), self.training_noise.log_sigmas))
        else:
            timesteps, levels = self._karras_schedule(
                num_inference_steps,
                respace=self._sigma_respacing,
                sigma_min=self.sigma_min,
                sigma_max=self.sigma_max,
                final_sigma=float(self.training_noise.sigmas[0]) if self.final_sigmas_type == "sigma_min" else 0.0,
            )
        if self.timestep_type == "continuous" and self.prediction_type == "v_prediction":
            # EDM-style conditioning: the model takes c_noise = log(sigma) / 4 (Karras et al., Table 1)
            timesteps = 0.25 * levels[:-1].log()
        return self._build_state(
            timesteps,
            levels,
            num_inference_steps=num_inference_steps,
            strength=strength,
            device=device,
        )

    def step(
        self,
        state: SchedulerState,
        model_output: Float[Tensor, "batch *rest"],
        step_index: int,
        sample: Float[Tensor, "batch *rest"],
        *,
        generator: Generator | None = None,
    ) -> Float[Tensor, "batch *rest"]:
        """One Euler step of ``dx/dsigma = (x - x0(x, sigma)) / sigma``."""
        j = state.position(step_index)
        sigma, sigma_next = state.full_sigmas[j], state.full_sigmas[j + 1]
        sample = sample.to(torch.float32)
        x0 = karras_data_prediction(self.prediction_type, model_output, sample, sigma=sigma)
        derivative = (sample - x0) / sigma
        prev_sample = sample + derivative * (sigma_next - sigma)
        return prev_sample.to(model_output.dtype)


__all__ = ["EulerDiscreteScheduler"]
