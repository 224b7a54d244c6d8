"""DPM-Solver++ multistep, deterministic (2M/3M) and SDE (Lu et al., 2022)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, final

import numpy as np
import torch
from jaxtyping import Float
from pydantic import field_validator
from torch import Tensor

from diffblocks.components.noise import Generator, randn_tensor
from diffblocks.components.schedulers.multistep import (
    AbstractMultistepScheduler,
    clipped_end,
    half_log_snr,
    vp_coefficients,
)
from diffblocks.components.schedulers.schedule import interpolate_sigmas, respace_sigmas, sigma_to_t
from diffblocks.components.schedulers.state import SchedulerState, StepRecord


@final
class DPMSolverMultistepScheduler(AbstractMultistepScheduler):
    """DPM-Solver++: a multistep exponential integrator on the data prediction.

    Implements Lu et al. (2022), "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models": ``algorithm_type="dpmsolver++"`` with ``solver_order=2`` is DPM++ 2M
    (Algorithm 2), ``"sde-dpmsolver++"`` its SDE variant (DPM++ 2M SDE), which draws fresh noise each
    step. Fields are diffusers' ``DPMSolverMultistepScheduler`` config keys (the deprecated
    noise-prediction ``dpmsolver`` variants and flow sigmas are not supported).

    Example:
        >>> s = DPMSolverMultistepScheduler(use_karras_sigmas=True)
        >>> state = s.set_timesteps(20)
        >>> len(state.timesteps), state.sigmas[-1].item()
        (20, 0.0)
    """

    fixed_config: ClassVar[Mapping[str, object]] = {"use_beta_sigmas": False, "use_flow_sigmas": False}

    algorithm_type: Literal["dpmsolver++", "sde-dpmsolver++"] = "dpmsolver++"
    solver_type: Literal["midpoint", "heun"] = "midpoint"
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"
    rescale_betas_zero_snr: bool = False
    euler_at_final: bool = False
    use_lu_lambdas: bool = False
    lambda_min_clipped: float = -math.inf
    variance_type: Literal["learned", "learned_range"] | None = None
    # read and written for config fidelity; they only act together with flow sigmas
    flow_shift: float = 1.0
    use_dynamic_shifting: bool = False
    time_shift_type: Literal["exponential"] = "exponential"

    def _zero_terminal_snr(self) -> bool:
        return self.rescale_betas_zero_snr

    @field_validator("algorithm_type", mode="before")
    @classmethod
    def _map_deis(cls, value: Any) -> Any:
        # a DEIS config loaded into this class: diffusers runs it as DPM-Solver++
        return "dpmsolver++" if value == "deis" else value

    @field_validator("solver_type", mode="before")
    @classmethod
    def _map_foreign_solver(cls, value: Any) -> Any:
        # solver types of DEIS/UniPC configs: diffusers falls back to midpoint
        return "midpoint" if value in ("logrho", "bh1", "bh2") else value

    def _schedule(self, num_steps: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Spaced timesteps above ``lambda_min_clipped``, or those of Karras, Lu or exponential sigmas."""
        noise = self.training_noise
        timesteps = self._spaced_timesteps(num_steps, end=clipped_end(noise, self.lambda_min_clipped))
        round_respaced = self.beta_schedule != "squaredcos_cap_v2"
        if self.use_karras_sigmas:
            levels = respace_sigmas("karras", noise.sigmas[::-1], num_steps)
            timesteps = sigma_to_t(levels, noise.log_sigmas)
            timesteps = np.round(timesteps) if round_respaced else timesteps
        elif self.use_lu_lambdas:
            # uniform in log-SNR (Lu et al., 2022): lambda = -log(sigma)
            high, low = float(noise.log_sigmas[-1]), float(noise.log_sigmas[0])
            levels = np.exp(high + np.linspace(0, 1, num_steps) * (low - high))
            timesteps = sigma_to_t(levels, noise.log_sigmas)
            timesteps = np.round(timesteps) if round_respaced else timesteps
        elif self.use_exponential_sigmas:
            levels = respace_sigmas("exponential", noise.sigmas[::-1], num_steps)
            timesteps = sigma_to_t(levels, noise.log_sigmas)
        else:
            levels = interpolate_sigmas(timesteps, noise.sigmas)
        return timesteps, levels, float(noise.sigmas[0]) if self.final_sigmas_type == "sigma_min" else 0.0

    def step(
        self,
        state: SchedulerState,
        model_output: Float[Tensor, "batch *rest"],
        step_index: int,
        sample: Float[Tensor, "batch *rest"],
        *,
        generator: Generator | None = None,
    ) -> Float[Tensor, "batch *rest"]:
        """One multistep update from ``sigma_i`` to ``sigma_{i+1}`` with the last ``order`` data predictions."""
        j = state.position(step_index)
        if self.variance_type is not None:
            model_output = model_output[:, : sample.shape[1]]  # drop the learned variance channels
        x0 = self._data_prediction(model_output, sample, state.full_sigmas[j])
        state.remember(step_index, StepRecord(x0, sample), keep=self.solver_order)
        order = self._order_at(state, step_index)
        # newest first: D_0 = x0 of this step, then those of the steps before
        predictions = [state.recall(step_index - k, needed_by=step_index).output for k in range(order)]
        lambdas = [half_log_snr(state.full_sigmas[j + 1 - k]) for k in range(order + 1)]
        noise = None
        if self.algorithm_type == "sde-dpmsolver++":
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device)
        h = lambdas[0] - lambdas[1]
        d1, d2 = _differences(predictions, lambdas, h)
        prev_sample = dpm_solver_update(
            sample.to(torch.float32),
            predictions[0],
            d1,
            d2,
            h=h,
            sigma=state.full_sigmas[j],
            sigma_next=state.full_sigmas[j + 1],
            midpoint=self.solver_type == "midpoint" and d2 is None,
            noise=noise,
        )
        return prev_sample.to(model_output.dtype)

    def _first_order_at_end(self) -> bool:
        # at sigma 0 (lambda = inf) only the first-order update is finite
        return self.euler_at_final or self.final_sigmas_type == "zero"


def _differences(predictions: list[Tensor], lambdas: list[float], h: float) -> tuple[Tensor | None, Tensor | None]:
    """``(D1, D2)``: backward differences of the data predictions (newest first) in log-SNR, scaled by ``h``."""
    if len(predictions) < 2:
        return None, None
    r0 = (lambdas[1] - lambdas[2]) / h
    d1_0 = (1.0 / r0) * (predictions[0] - predictions[1])
    if len(predictions) == 2:
        return d1_0, None
    r1 = (lambdas[2] - lambdas[3]) / h
    d1_1 = (1.0 / r1) * (predictions[1] - predictions[2])
    return d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1), (1.0 / (r0 + r1)) * (d1_0 - d1_1)


def dpm_solver_update(
    sample: Tensor,
    d0: Tensor,
    d1: Tensor | None,
    d2: Tensor | None,
    *,
    h: float,
    sigma: float,
    sigma_next: float,
    midpoint: bool,
    noise: Tensor | None,
) -> Tensor:
    """DPM-Solver++(k) in data prediction from ``sigma`` to ``sigma_next`` (Lu et al., 2022, Eqs. 8-9 and App. B).

    Args:
        sample: the sample at ``sigma``.
        d0: the data prediction at ``sigma``.
        d1: its first derivative in log-SNR, times ``h`` (second and third order).
        d2: its second derivative term (third order, Heun form).
        h: the step in log-SNR, ``lambda(sigma_next) - lambda(sigma)``.
        midpoint: weigh ``d1`` by the midpoint rule (second order) rather than the Taylor term.
        noise: fresh noise for the SDE variant (DPM++ SDE), None for the ODE.
    """
    alpha_t, sigma_t = vp_coefficients(sigma_next)
    sigma_s = vp_coefficients(sigma)[1]
    if noise is None:  # the diffusion ODE
        phi_1 = math.exp(-h) - 1.0
        x_t = (sigma_t / sigma_s) * sample - (alpha_t * phi_1) * d0
        if d1 is not None and midpoint:
            x_t = x_t - (0.5 * alpha_t * phi_1) * d1
        elif d1 is not None:
            x_t = x_t + (alpha_t * (phi_1 / h + 1.0)) * d1
        if d2 is not None:
            x_t = x_t - (alpha_t * ((phi_1 + h) / h**2 - 0.5)) * d2
        return x_t
    # the diffusion SDE: the same data terms over 2h, plus fresh noise
    psi = 1.0 - math.exp(-2.0 * h)
    x_t = (sigma_t / sigma_s * math.exp(-h)) * sample + (alpha_t * psi) * d0
    if d1 is not None and midpoint:
        x_t = x_t + (0.5 * alpha_t * psi) * d1
    elif d1 is not None:
        x_t = x_t + (alpha_t * (psi / (-2.0 * h) + 1.0)) * d1
    if d2 is not None:
        x_t = x_t + (alpha_t * ((psi - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * d2
    return x_t + (sigma_t * math.sqrt(psi)) * noise


__all__ = ["DPMSolverMultistepScheduler", "dpm_solver_update"]
