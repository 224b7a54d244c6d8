"""UniPC: unified predictor-corrector multistep sampling (Zhao et al., 2023)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, final

import numpy as np
from jaxtyping import Float
from pydantic import Field, field_validator
from torch import Tensor

from diffblocks.components.noise import Generator
from diffblocks.components.schedulers.multistep import (
    AbstractMultistepScheduler,
    half_log_snr,
    vp_coefficients,
)
from diffblocks.components.schedulers.prediction import noise_prediction
from diffblocks.components.schedulers.schedule import interpolate_sigmas
from diffblocks.components.schedulers.state import SchedulerState, StepRecord


@final
class UniPCMultistepScheduler(AbstractMultistepScheduler):
    """UniPC: the UniP predictor, then the UniC corrector once the model has seen the predicted sample.

    Implements Zhao et al. (2023), "UniPC: A Unified Predictor-Corrector Framework for Fast
    Sampling of Diffusion Models", with the B(h) variants ``bh1`` and ``bh2``. The corrector reuses
    the model evaluation of the next step, so it costs no extra call. Fields are diffusers'
    ``UniPCMultistepScheduler`` config keys (flow sigmas and ``solver_p`` are not supported).

    Example:
        >>> s = UniPCMultistepScheduler(solver_order=3)
        >>> s.set_timesteps(5).timesteps.tolist()
        [999, 799, 599, 400, 200]
    """

    fixed_config: ClassVar[Mapping[str, object]] = {
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "use_dynamic_shifting": False,
        "solver_p": None,
        "shift_terminal": None,
    }

    predict_x0: bool = True
    solver_type: Literal["bh1", "bh2"] = "bh2"
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"
    rescale_betas_zero_snr: bool = False
    disable_corrector: tuple[int, ...] = ()
    sigma_min: float | None = Field(default=None, gt=0.0)
    sigma_max: float | None = Field(default=None, gt=0.0)
    # read and written for config fidelity; they only act together with flow sigmas
    flow_shift: float = 1.0
    time_shift_type: Literal["exponential", "linear"] = "exponential"

    def _zero_terminal_snr(self) -> bool:
        return self.rescale_betas_zero_snr

    @field_validator("solver_type", mode="before")
    @classmethod
    def _map_foreign_solver(cls, value: Any) -> Any:
        # solver types of DPM-Solver/DEIS configs: diffusers falls back to bh2
        return "bh2" if value in ("midpoint", "heun", "logrho") else value

    def _schedule(self, num_steps: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Spaced timesteps, or those of Karras or exponential sigmas within ``[sigma_min, sigma_max]``."""
        kind = self._sigma_respacing
        if kind is None:
            timesteps = self._spaced_timesteps(num_steps)
            levels, lowest = interpolate_sigmas(timesteps, self.training_noise.sigmas), self.training_noise.sigmas[0]
        else:
            timesteps, levels = self._respaced(kind, num_steps, sigma_min=self.sigma_min, sigma_max=self.sigma_max)
            lowest = levels[-1]
        return timesteps, levels, float(lowest) if self.final_sigmas_type == "sigma_min" else 0.0

    def step(
        self,
        state: SchedulerState,
        model_output: Float[Tensor, "batch *rest"],
        step_index: int,
        sample: Float[Tensor, "batch *rest"],
        *,
        generator: Generator | None = None,
    ) -> Float[Tensor, "batch *rest"]:
        """Correct the sample the last step predicted (UniC), then predict the next one (UniP)."""
        j = state.position(step_index)
        converted = self._convert(model_output, sample, state.full_sigmas[j])
        if step_index > 0 and j - 1 not in self.disable_corrector:
            # this output was taken at the sample the last step predicted: use it to correct that step
            last = state.recall(step_index - 1, needed_by=step_index)
            history = self._outputs(state, step_index - 1, self._order_at(state, step_index - 1), step_index)
            sample = self._bh_update(last.sample, history, state, j - 1, corrector=converted)
        state.remember(step_index, StepRecord(converted, sample), keep=4)
        history = self._outputs(state, step_index, self._order_at(state, step_index), step_index)
        return self._bh_update(sample, history, state, j)

    def _convert(self, model_output: Tensor, sample: Tensor, sigma: float) -> Tensor:
        """What the solver integrates: the data prediction, or the noise prediction if not ``predict_x0``."""
        if self.predict_x0:
            return self._data_prediction(model_output, sample, sigma)
        alpha_t, sigma_t = vp_coefficients(sigma)
        return noise_prediction(self.prediction_type, model_output, sample, alpha=alpha_t, sigma=sigma_t)

    def _order_at(self, state: SchedulerState, step_index: int) -> int:
        """Limited by the outputs stored so far and, with ``lower_order_final``, by the steps left."""
        order = self.solver_order
        if self.lower_order_final:
            order = min(order, len(state.full_timesteps) - state.position(step_index))
        return min(order, step_index + 1)

    @staticmethod
    def _outputs(state: SchedulerState, step_index: int, order: int, needed_by: int) -> list[Tensor]:
        """Converted outputs of ``step_index`` and the ``order - 1`` steps before it, newest first."""
        return [state.recall(step_index - k, needed_by=needed_by).output for k in range(order)]

    def _bh_update(
        self,
        sample: Tensor,
        outputs: list[Tensor],
        state: SchedulerState,
        start: int,
        *,
        corrector: Tensor | None = None,
    ) -> Tensor:
        """UniP-p from ``sigma_start`` to ``sigma_{start+1}`` (Zhao et al., 2023, Algorithm 2); given
        ``corrector``, the model output at ``sigma_{start+1}``, it is UniC-p instead (Algorithm 1).

        Args:
            sample: the sample at ``sigma_start``.
            outputs: converted model outputs at ``sigma_start, sigma_{start-1}, ...``; their count
                is the order ``p``.
            start: position of the starting level in the full schedule.
        """
        levels = state.full_sigmas
        alpha_t, sigma_t = vp_coefficients(levels[start + 1])
        alpha_s0, sigma_s0 = vp_coefficients(levels[start])
        lambda_s0 = half_log_snr(levels[start])
        h = half_log_snr(levels[start + 1]) - lambda_s0
        m0 = outputs[0]
        # r_k: where the earlier outputs sit, in units of h; D_k: their scaled differences
        rks = [(half_log_snr(levels[start - k]) - lambda_s0) / h for k in range(1, len(outputs))]
        differences = [(outputs[k] - m0) / rk for k, rk in enumerate(rks, start=1)]
        if corrector is not None:
            differences.append(corrector - m0)  # the new output sits at r = 1
        hh = -h if self.predict_x0 else h
        h_phi_1 = math.expm1(hh)
        b_h = hh if self.solver_type == "bh1" else h_phi_1
        rhos = _rhos(rks, hh, b_h, corrector=corrector is not None)
        if self.predict_x0:
            x_t = (sigma_t / sigma_s0) * sample - (alpha_t * h_phi_1) * m0
            scale = alpha_t * b_h
        else:
            x_t = (alpha_t / alpha_s0) * sample - (sigma_t * h_phi_1) * m0
            scale = sigma_t * b_h
        terms = [rho * d for rho, d in zip(rhos, differences, strict=True)]
        if terms:
            x_t = x_t - scale * sum(terms[1:], terms[0])
        return x_t.to(sample.dtype)


def _rhos(rks: list[float], hh: float, b_h: float, *, corrector: bool) -> list[float]:
    """Weights of the differences: the solution of ``R rho = b`` (Zhao et al., 2023, Eq. 8).

    The predictor weighs the ``p - 1`` earlier outputs, the corrector also the new one at ``r = 1``;
    the two lowest orders use the closed form 1/2.
    """
    order = len(rks) + 1
    if order == (1 if corrector else 2):
        return [0.5]
    size = order if corrector else order - 1
    if size == 0:
        return []
    # b_k = k! phi_{k+1}(hh) / B(h), with phi_k the exponential-integrator phi functions
    h_phi_k, factorial, b = math.expm1(hh) / hh - 1, 1, list[float]()
    for i in range(1, size + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    nodes = np.array([*rks, 1.0])[:size]
    r = np.stack([nodes**k for k in range(size)])
    return np.linalg.solve(r, np.array(b)).tolist()


__all__ = ["UniPCMultistepScheduler"]
