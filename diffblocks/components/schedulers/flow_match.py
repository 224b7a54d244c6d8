"""Euler sampling of a flow-matching / rectified-flow ODE (Lipman et al., 2022; Liu et al., 2022)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal, final

import numpy as np
import torch
from jaxtyping import Float
from pydantic import Field
from torch import Tensor

from diffblocks.components.noise import Generator, randn_tensor
from diffblocks.components.schedulers.base import MAX_TRAIN_TIMESTEPS, AbstractScheduler
from diffblocks.components.schedulers.karras import SigmaRespacingMixin
from diffblocks.components.schedulers.schedule import respace_sigmas
from diffblocks.components.schedulers.state import SchedulerState, flow_strength_begin


def flux_sigmas(num_inference_steps: int) -> list[float]:
    """The sigmas Flux pipelines pass: ``linspace(1, 1 / n, n)``, before the ``mu`` shift."""
    return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps).tolist()


@final
class FlowMatchEulerDiscreteScheduler(SigmaRespacingMixin, AbstractScheduler):
    """Euler steps ``x += (sigma_next - sigma) v`` along the straight path ``x = (1 - sigma) x0 + sigma eps``.

    The model predicts the velocity ``v = eps - x0`` of flow matching (Lipman et al., 2022, "Flow
    Matching for Generative Modeling") / rectified flow (Liu et al., 2022). Sigmas are shifted
    towards noise, by ``shift`` or, with ``use_dynamic_shifting``, by a per-resolution ``mu``
    (Esser et al., 2024): ``sigma' = e^mu / (e^mu + 1 / sigma - 1)``. Fields are diffusers'
    ``FlowMatchEulerDiscreteScheduler`` config keys; ``mu`` is ignored without dynamic shifting,
    as Flux pipelines pass it regardless.

    Example:
        >>> s = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
        >>> mu = s.mu_for_image_seq_len(4096)  # a 1024x1024 Flux image: (1024 / 16) ** 2 tokens
        >>> state = s.set_timesteps(4, mu=mu, sigmas=flux_sigmas(4))
        >>> [round(t) for t in state.timesteps.tolist()]
        [1000, 905, 760, 513]
    """

    fixed_config: ClassVar[Mapping[str, object]] = {"use_beta_sigmas": False}

    num_train_timesteps: int = Field(default=1000, ge=1, le=MAX_TRAIN_TIMESTEPS)
    shift: float = Field(default=1.0, gt=0.0)
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = Field(default=256, ge=1)
    max_image_seq_len: int = Field(default=4096, ge=1)
    invert_sigmas: bool = False
    shift_terminal: float | None = Field(default=None, ge=0.0, lt=1.0)
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    time_shift_type: Literal["exponential", "linear"] = "exponential"
    stochastic_sampling: bool = False

    def mu_for_image_seq_len(self, image_seq_len: int) -> float:
        """Flux's resolution-dependent shift: ``mu`` linear in the number of image tokens.

        ``base_shift`` at ``base_image_seq_len`` tokens, ``max_shift`` at ``max_image_seq_len``
        (extrapolated beyond). For Flux, ``image_seq_len = (height // 16) * (width // 16)``.
        """
        if self.base_shift is None or self.max_shift is None:
            raise ValueError(f"mu needs base_shift and max_shift, got {self.base_shift} and {self.max_shift}.")
        if self.max_image_seq_len == self.base_image_seq_len:
            raise ValueError(f"max_image_seq_len equals base_image_seq_len ({self.base_image_seq_len}).")
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * slope + (self.base_shift - slope * self.base_image_seq_len)

    def _shifted(self, sigmas: np.ndarray, mu: float | None) -> np.ndarray:
        """Shift sigmas towards 1 (more time at high noise, which larger images need)."""
        if self.use_dynamic_shifting:
            assert mu is not None
            if self.time_shift_type == "exponential":
                return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
            return mu / (mu + (1 / sigmas - 1))
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)

    def set_timesteps(
        self,
        num_inference_steps: int,
        *,
        device: torch.device | str | None = None,
        strength: float = 1.0,
        mu: float | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> SchedulerState:
        """Sigmas from ``1`` down to the training minimum (or custom ``sigmas``), shifted; timesteps ``1000 sigma``."""
        self._check_request(num_inference_steps)
        if self.use_dynamic_shifting and mu is None:
            raise ValueError("use_dynamic_shifting needs mu (see mu_for_image_seq_len).")
        if sigmas is not None:
            if len(sigmas) != num_inference_steps:
                raise ValueError(f"got {len(sigmas)} sigmas for num_inference_steps {num_inference_steps}.")
            levels = np.array(sigmas).astype(np.float32)
        else:
            top, bottom = self._training_range()
            t = self.num_train_timesteps
            levels = np.linspace(top * t, bottom * t, num_inference_steps) / t
        levels = self._shifted(levels, mu)
        if self.shift_terminal:
            # stretch so the last sigma lands on shift_terminal
            one_minus = 1 - levels
            levels = 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))
        kind = self._sigma_respacing
        if kind is not None:
            levels = respace_sigmas(kind, levels, num_inference_steps)
        sigma_tensor = torch.from_numpy(np.asarray(levels)).to(torch.float32)
        if self.invert_sigmas:
            sigma_tensor = 1.0 - sigma_tensor
        timesteps = sigma_tensor * self.num_train_timesteps
        end = torch.ones(1) if self.invert_sigmas else torch.zeros(1)
        return self._build_state(
            timesteps,
            torch.cat([sigma_tensor, end]),
            num_inference_steps=num_inference_steps,
            strength=strength,
            device=device,
        )

    def _begin_index(self, num_inference_steps: int, strength: float) -> int:
        """First step run for ``strength``, as diffusers' flow-matching pipelines count it."""
        return flow_strength_begin(num_inference_steps, strength)

    def _training_range(self) -> tuple[float, float]:
        """Largest and smallest training sigma, computed in float32 as diffusers does."""
        ends = torch.tensor([self.num_train_timesteps, 1.0], dtype=torch.float32) / self.num_train_timesteps
        if not self.use_dynamic_shifting:
            ends = self.shift * ends / (1 + (self.shift - 1) * ends)
        return float(ends[0]), float(ends[1])

    def step(
        self,
        state: SchedulerState,
        model_output: Float[Tensor, "batch *rest"],
        step_index: int,
        sample: Float[Tensor, "batch *rest"],
        *,
        generator: Generator | None = None,
    ) -> Float[Tensor, "batch *rest"]:
        """Euler along the predicted velocity; with ``stochastic_sampling``, re-noise the ``x0`` estimate."""
        j = state.position(step_index)
        sigma, sigma_next = state.full_sigmas[j], state.full_sigmas[j + 1]
        sample = sample.to(torch.float32)
        if self.stochastic_sampling:
            x0 = sample - sigma * model_output
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = (1.0 - sigma_next) * x0 + sigma_next * noise
        else:
            # diffusers' arithmetic, so that bf16 runs match too: the step is a difference of float32
            # sigmas, and as a 0-d tensor it is cast to the model output's dtype before the product
            dt = torch.tensor(np.float32(sigma_next) - np.float32(sigma))
            prev_sample = sample + dt * model_output
        return prev_sample.to(model_output.dtype)

    def add_noise(
        self,
        state: SchedulerState,
        original: Float[Tensor, "batch *rest"],
        noise: Float[Tensor, "batch *rest"],
        step_index: int,
    ) -> Float[Tensor, "batch *rest"]:
        """``sigma * noise + (1 - sigma) * original``: the point of the straight path at this step."""
        return flow_add_noise(state, original, noise, step_index)


def flow_add_noise(
    state: SchedulerState, original: Float[Tensor, "batch *rest"], noise: Float[Tensor, "batch *rest"], step_index: int
) -> Float[Tensor, "batch *rest"]:
    """The point of the straight path from ``original`` to ``noise`` at step ``step_index`` (every flow scheduler)."""
    # sigma in the latents' dtype, as diffusers casts its sigmas: in bf16 that is bf16 arithmetic
    sigma = torch.tensor(state.full_sigmas[state.position(step_index)], dtype=original.dtype)
    return sigma * noise + (1.0 - sigma) * original


__all__ = ["FlowMatchEulerDiscreteScheduler", "flux_sigmas"]
