"""DPM-Solver++ single-step: each k-th order step spends k model calls on its own sub-steps (Lu et al., 2022)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, final

import numpy as np
from jaxtyping import Float
from pydantic import field_validator
from torch import Tensor

from diffblocks.components.noise import Generator, randn_tensor
from diffblocks.components.schedulers.dpm_solver import dpm_solver_update
from diffblocks.components.schedulers.multistep import AbstractLogSNRScheduler, clipped_end, half_log_snr
from diffblocks.components.schedulers.schedule import interpolate_sigmas, spaced_timesteps
from diffblocks.components.schedulers.state import SchedulerState, StepRecord


def singlestep_orders(num_steps: int, solver_order: int, *, lower_order_final: bool, final_zero: bool) -> list[int]:
    """The order of each model call: ``1, 2, ..., solver_order`` per step, repeated (diffusers' ``get_order_list``).

    With ``lower_order_final`` the leftover calls form one shorter step at the end (a full-order
    step with a first-order last call when the count divides evenly); ending at sigma 0 makes the
    last call first order.
    """
    cycle = list(range(1, solver_order + 1))
    full, rest = divmod(num_steps, solver_order)
    if not lower_order_final:
        orders = cycle * full
    elif rest == 0 and solver_order > 1:
        orders = cycle * (full - 1) + cycle[:-1] + [1]
    else:
        orders = cycle * full + cycle[:rest]
    if final_zero:
        orders[-1] = 1
    return orders


@final
class DPMSolverSinglestepScheduler(AbstractLogSNRScheduler):
    """DPM-Solver++ single-step: a k-th order step from ``sigma_s`` spends its k model calls on the
    schedule's own levels in between, then jumps from ``sigma_s`` with all of them.

    Implements the single-step DPM-Solver++(2S/3S) of Lu et al. (2022), "DPM-Solver++: Fast Solver
    for Guided Sampling of Diffusion Probabilistic Models" (Algorithm 1, with the intermediate points
    on the schedule as diffusers places them): the call at position ``p`` has order
    ``orders[p]`` (:func:`singlestep_orders`), and a call of order ``k`` updates from the sample of
    ``k - 1`` calls before, with the data predictions of those calls. ``"sde-dpmsolver++"`` draws
    fresh noise every call. Fields are diffusers' ``DPMSolverSinglestepScheduler`` config keys (the
    deprecated noise-prediction ``dpmsolver`` and flow sigmas are not supported).

    Example:
        >>> s = DPMSolverSinglestepScheduler(solver_order=3)
        >>> state = s.set_timesteps(7)
        >>> len(state.timesteps), singlestep_orders(7, 3, lower_order_final=True, final_zero=True)
        (7, [1, 2, 3, 1, 2, 3, 1])
    """

    fixed_config: ClassVar[Mapping[str, object]] = {"use_beta_sigmas": False, "use_flow_sigmas": False}

    algorithm_type: Literal["dpmsolver++", "sde-dpmsolver++"] = "dpmsolver++"
    solver_type: Literal["midpoint", "heun"] = "midpoint"
    lower_order_final: bool = False
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"
    lambda_min_clipped: float = -math.inf
    variance_type: Literal["learned", "learned_range"] | None = None
    # read and written for config fidelity; they only act together with flow sigmas
    flow_shift: float = 1.0
    use_dynamic_shifting: bool = False
    time_shift_type: Literal["exponential"] = "exponential"

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
        """Linearly spaced timesteps above ``lambda_min_clipped``, or those of Karras or exponential sigmas."""
        noise = self.training_noise
        kind = self._sigma_respacing
        if kind is None:
            end = clipped_end(noise, self.lambda_min_clipped)
            # num_steps + 1 points, the one at 0 dropped
            total = self.num_train_timesteps
            timesteps = spaced_timesteps("linspace", num_steps + 1, num_train_timesteps=total, end=end)[:-1]
            levels = interpolate_sigmas(timesteps, noise.sigmas)
        else:
            timesteps, levels = self._respaced(kind, num_steps)
        return timesteps, levels, float(noise.sigmas[0]) if self.final_sigmas_type == "sigma_min" else 0.0

    def _orders(self, state: SchedulerState) -> list[int]:
        """The order of every call; as diffusers, an uneven count or a final 0 forces ``lower_order_final``."""
        steps = len(state.full_timesteps)
        final_zero = self.final_sigmas_type == "zero"
        lower = self.lower_order_final or steps % self.solver_order != 0 or final_zero
        return singlestep_orders(steps, self.solver_order, lower_order_final=lower, final_zero=final_zero)

    def step(
        self,
        state: SchedulerState,
        model_output: Float[Tensor, "batch *rest"],
        step_index: int,
        sample: Float[Tensor, "batch *rest"],
        *,
        generator: Generator | None = None,
    ) -> Float[Tensor, "batch *rest"]:
        """A call of order ``k``: DPM-Solver++(k) from the sample ``k - 1`` calls back to the next level."""
        j = state.position(step_index)
        if self.variance_type is not None:
            model_output = model_output[:, : sample.shape[1]]  # drop the learned variance channels
        x0 = self._data_prediction(model_output, sample, state.full_sigmas[j])
        state.remember(step_index, StepRecord(x0, sample), keep=self.solver_order)
        noise = None
        if self.algorithm_type == "sde-dpmsolver++":
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
        # an image-to-image run may start inside a step: use only the calls it made
        order = min(self._orders(state)[j], step_index + 1)
        # newest first: m_0 = x0 of this call, then those of the calls before, back to the step's start
        predictions = [state.recall(step_index - k, needed_by=step_index).output for k in range(order)]
        lambdas = [half_log_snr(state.full_sigmas[j + 1 - k]) for k in range(order + 1)]
        start = state.recall(step_index - order + 1, needed_by=step_index).sample
        h = lambdas[0] - lambdas[-1]
        d0, d1, d2 = _differences(predictions, lambdas, h, heun=self.solver_type == "heun")
        return dpm_solver_update(
            start,
            d0,
            d1,
            d2,
            h=h,
            sigma=state.full_sigmas[j + 1 - order],
            sigma_next=state.full_sigmas[j + 1],
            midpoint=self.solver_type == "midpoint" and order == 2,
            noise=noise,
        )


def _differences(
    predictions: list[Tensor], lambdas: list[float], h: float, *, heun: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(D0, D1, D2)`` of a single step: the data prediction at its start and its scaled derivatives.

    ``predictions`` run newest first back to the step's start, at ``lambdas[1:]``; ``r_k`` places
    the later calls within the step, in units of ``h``. The third-order midpoint form keeps only
    the newest first difference (Lu et al., 2022, Algorithm 1, DPM-Solver-3 with ``r_1 = 1/3``,
    ``r_2 = 2/3`` generalised).
    """
    base = predictions[-1]
    if len(predictions) == 1:
        return base, None, None
    if len(predictions) == 2:
        r0 = (lambdas[1] - lambdas[2]) / h
        return base, (1.0 / r0) * (predictions[0] - base), None
    r0, r1 = (lambdas[1] - lambdas[3]) / h, (lambdas[2] - lambdas[3]) / h
    d1_0 = (1.0 / r1) * (predictions[1] - base)
    d1_1 = (1.0 / r0) * (predictions[0] - base)
    if not heun:
        return base, d1_1, None
    return base, (r0 * d1_0 - r1 * d1_1) / (r0 - r1), 2.0 * (d1_1 - d1_0) / (r0 - r1)


__all__ = ["DPMSolverSinglestepScheduler", "singlestep_orders"]
