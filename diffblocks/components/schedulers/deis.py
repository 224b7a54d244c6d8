"""DEIS: diffusion exponential integrator sampling, multistep in ``rho`` (Zhang & Chen, 2022)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, final

import numpy as np
import torch
from jaxtyping import Float
from numpy.polynomial import Polynomial
from pydantic import field_validator
from torch import Tensor

from diffblocks.components.noise import Generator
from diffblocks.components.schedulers.multistep import AbstractMultistepScheduler
from diffblocks.components.schedulers.prediction import data_prediction, dynamic_threshold
from diffblocks.components.schedulers.schedule import interpolate_sigmas
from diffblocks.components.schedulers.state import SchedulerState, StepRecord


def log_rho_weights(rho_next: float, rhos: list[float]) -> list[float]:
    """``int_{rhos[0]}^{rho_next} l_k(log rho) d rho`` for the Lagrange basis ``l_k`` through ``log rhos``.

    The noise predictions at ``rhos`` (newest first) are extrapolated by a polynomial in ``log rho``
    and integrated exactly: ``int p(log r) dr = r q(log r)`` with ``q = p - p' + p'' - ...``.
    """
    logs = [math.log(r) for r in rhos]
    weights = list[float]()
    for k, node in enumerate(logs):
        others = logs[:k] + logs[k + 1 :]
        basis = Polynomial.fromroots(others) if others else Polynomial([1.0])
        basis = basis / math.prod(node - other for other in others)
        antiderivative = sum(((-1) ** i * basis.deriv(i) for i in range(1, len(logs))), basis)
        weights.append(float(rho_next * antiderivative(math.log(rho_next)) - rhos[0] * antiderivative(logs[0])))
    return weights


@final
class DEISMultistepScheduler(AbstractMultistepScheduler):
    """DEIS: the exponential integrator of the diffusion ODE with a polynomial fit of past noise predictions.

    Implements ``rho``AB-DEIS of Zhang & Chen (2022), "Fast Sampling of Diffusion Models with
    Exponential Integrator": with ``rho = sigma_t / alpha_t`` (the Karras sigma), the ODE is
    ``d(x / alpha) = eps d rho``; each step integrates the Lagrange polynomial in ``log rho``
    through the last ``solver_order`` noise predictions (diffusers' ``logrho`` solver). The
    schedule ends at the lowest training level, never at 0. Fields are diffusers'
    ``DEISMultistepScheduler`` config keys (flow sigmas are not supported).

    Example:
        >>> s = DEISMultistepScheduler(solver_order=3)
        >>> state = s.set_timesteps(5)
        >>> state.timesteps.tolist(), round(state.full_sigmas[-1], 4)
        ([999, 799, 599, 400, 200], 0.01)
    """

    fixed_config: ClassVar[Mapping[str, object]] = {"use_beta_sigmas": False, "use_flow_sigmas": False}

    algorithm_type: Literal["deis"] = "deis"
    solver_type: Literal["logrho"] = "logrho"
    # read and written for config fidelity; they only act together with flow sigmas
    flow_shift: float = 1.0
    use_dynamic_shifting: bool = False
    time_shift_type: Literal["exponential"] = "exponential"

    @field_validator("algorithm_type", mode="before")
    @classmethod
    def _map_dpm_solver(cls, value: Any) -> Any:
        # a DPM-Solver config loaded into this class: diffusers runs it as DEIS
        return "deis" if value in ("dpmsolver", "dpmsolver++") else value

    @field_validator("solver_type", mode="before")
    @classmethod
    def _map_foreign_solver(cls, value: Any) -> Any:
        # solver types of DPM-Solver/UniPC configs: diffusers falls back to logrho
        return "logrho" if value in ("midpoint", "heun", "bh1", "bh2") else value

    def _schedule(self, num_steps: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Spaced timesteps, or those of Karras or exponential sigmas; the last level is repeated at the end."""
        kind = self._sigma_respacing
        if kind is None:
            noise = self.training_noise
            timesteps = self._spaced_timesteps(num_steps)
            return timesteps, interpolate_sigmas(timesteps, noise.sigmas), float(noise.sigmas[0])
        timesteps, levels = self._respaced(kind, num_steps)
        # so the last re-spaced step goes from the lowest level to itself: it leaves the sample as is
        return timesteps, levels, float(levels[-1])

    def step(
        self,
        state: SchedulerState,
        model_output: Float[Tensor, "batch *rest"],
        step_index: int,
        sample: Float[Tensor, "batch *rest"],
        *,
        generator: Generator | None = None,
    ) -> Float[Tensor, "batch *rest"]:
        """First order: DDIM's step. Higher: ``x_next = alpha_next (x / alpha + sum_k w_k eps_k)``, ``w_k``
        the integrated basis of :func:`log_rho_weights`.

        The coefficients are float32 0-d tensors, as in diffusers: from ``rho = 157`` (linear betas)
        ``x / alpha`` and the noise term cancel almost every digit, so their rounding shows.
        """
        j = state.position(step_index)
        levels = state.full_sigmas  # rho of each step
        alpha, sigma = _vp_float32(levels[j])
        alpha_next, sigma_next = _vp_float32(levels[j + 1])
        x0 = data_prediction(self.prediction_type, model_output, sample, alpha=alpha, sigma=sigma)
        if self.thresholding:
            x0 = dynamic_threshold(x0, ratio=self.dynamic_thresholding_ratio, max_value=self.sample_max_value)
        eps = (sample - alpha * x0) / sigma  # the noise prediction the (thresholded) x0 implies
        state.remember(step_index, StepRecord(eps, sample), keep=self.solver_order)
        order = self._order_at(state, step_index)
        if order == 1:  # x_next = alpha_next (x / alpha + (rho_next - rho) eps), as diffusers writes it
            h = (alpha_next.log() - sigma_next.log()) - (alpha.log() - sigma.log())
            return (alpha_next / alpha) * sample - (sigma_next * (h.exp() - 1.0)) * eps
        weights = log_rho_weights(levels[j + 1], [levels[j - k] for k in range(order)])
        terms = [w * state.recall(step_index - k, needed_by=step_index).output for k, w in enumerate(weights)]
        return alpha_next * (sample / alpha + sum(terms[1:], terms[0]))


def _vp_float32(rho: float) -> tuple[Tensor, Tensor]:
    """``(alpha_t, sigma_t)`` of the level ``rho`` as float32 0-d tensors, computed as diffusers does."""
    level = torch.tensor(rho, dtype=torch.float32)
    alpha = 1 / (level**2 + 1) ** 0.5
    return alpha, level * alpha


__all__ = ["DEISMultistepScheduler", "log_rho_weights"]
