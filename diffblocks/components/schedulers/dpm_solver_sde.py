"""DPM-Solver++ SDE, second order single-step, with Brownian-tree noise (Lu et al., 2022; k-diffusion)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal, final

import numpy as np
import torch
from jaxtyping import Float
from pydantic import Field
from torch import Tensor

from diffblocks.components.noise import Generator
from diffblocks.components.schedulers.brownian import BrownianTree
from diffblocks.components.schedulers.karras import AbstractKarrasScheduler, SigmaRespacingMixin, float32_tensor
from diffblocks.components.schedulers.prediction import karras_data_prediction
from diffblocks.components.schedulers.schedule import interpolate_sigmas, respace_sigmas, sigma_to_t, spaced_timesteps
from diffblocks.components.schedulers.state import SchedulerState, StepRecord


def _log_midpoint(sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """The level halfway between two sigmas in ``t = -log(sigma)``, in float32 as diffusers computes it."""
    t, t_next = sigma.log().neg(), sigma_next.log().neg()
    return (t + (t_next - t) * 0.5).neg().exp()


@final
class DPMSolverSDEScheduler(SigmaRespacingMixin, AbstractKarrasScheduler):
    """DPM-Solver++(2S) SDE: an ancestral exponential-integrator step to the log-midpoint, then the full step.

    Implements the stochastic second-order single-step DPM-Solver++ of Lu et al. (2022),
    "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", as
    k-diffusion's ``sample_dpmpp_sde`` (``eta=1``, ``r=1/2``), usually run with the Karras sigmas
    of Karras et al. (2022). Each stage takes a deterministic exponential step to ``sigma_down``
    and adds ``sigma_up`` of noise from one Brownian path (:class:`BrownianTree`), so the two
    stages of a step see correlated noise. Two model calls per step: ``state.timesteps`` holds
    each step's timestep, then that of its log-midpoint (``2 n - 1`` calls; the last step, to
    sigma 0, is a plain Euler step).

    Fields are diffusers' ``DPMSolverSDEScheduler`` config keys. ``noise_sampler_seed`` fixes the
    Brownian path (a seed gives diffusers' noise); when it is None the seed is drawn from the
    ``step`` generator (diffusers draws it from torch's global generator).

    Example:
        >>> s = DPMSolverSDEScheduler(use_karras_sigmas=True, noise_sampler_seed=0)
        >>> state = s.set_timesteps(4)
        >>> len(state.timesteps), [round(s, 4) for s in state.sigmas.tolist()[-3:]]
        (7, [0.0292, 0.0292, 0.0])
    """

    order: ClassVar[int] = 2
    fixed_config: ClassVar[Mapping[str, object]] = {"use_beta_sigmas": False}

    beta_start: float = Field(default=0.00085, gt=0.0, lt=1.0)
    beta_end: float = Field(default=0.012, gt=0.0, lt=1.0)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    noise_sampler_seed: int | None = Field(default=None, ge=0)

    def _model_schedule(self, num_steps: int) -> tuple[Tensor, Tensor]:
        """Each step's timestep, then its log-midpoint's; every interior sigma twice, then 0.

        Unlike the other sigma schedulers, diffusers keeps these timesteps in float64.
        """
        noise = self.training_noise
        timesteps = spaced_timesteps(
            self.timestep_spacing,
            num_steps,
            num_train_timesteps=self.num_train_timesteps,
            steps_offset=self.steps_offset,
            round_linspace=False,
        ).astype(np.float64)
        levels = interpolate_sigmas(timesteps, noise.sigmas)
        respace = self._sigma_respacing
        if respace is not None:
            levels = respace_sigmas(respace, levels, num_steps)
            timesteps = sigma_to_t(levels, noise.log_sigmas)
        t = -np.log(levels)
        midpoints = sigma_to_t(np.exp(-(t[:-1] + np.diff(t) * 0.5)), noise.log_sigmas)
        calls = torch.from_numpy(np.asarray(timesteps))
        calls = torch.cat([calls[:1], calls[1:].repeat_interleave(2)])
        calls[1::2] = torch.from_numpy(np.asarray(midpoints))
        sigmas = float32_tensor(np.concatenate([levels, [0.0]]))
        return calls, torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])

    def _stage_sigmas(self, state: SchedulerState, step_index: int) -> tuple[Tensor, Tensor]:
        """``(sigma, sigma_next)`` of the step that call ``step_index`` belongs to, as float32 scalars."""
        j = state.position(step_index)
        levels = state.full_sigmas
        pair = (levels[j], levels[j + 1]) if j % 2 == 0 else (levels[j - 1], levels[j])
        return torch.tensor(pair[0], dtype=torch.float32), torch.tensor(pair[1], dtype=torch.float32)

    def scale_model_input(
        self, state: SchedulerState, sample: Float[Tensor, "batch *rest"], step_index: int
    ) -> Float[Tensor, "batch *rest"]:
        """``sample / sqrt(sigma**2 + 1)`` at the step's sigma, or at its log-midpoint for the second call."""
        sigma, sigma_next = self._stage_sigmas(state, step_index)
        level = sigma if state.position(step_index) % 2 == 0 else _log_midpoint(sigma, sigma_next)
        return sample / ((level**2 + 1) ** 0.5)

    def step(
        self,
        state: SchedulerState,
        model_output: Float[Tensor, "batch *rest"],
        step_index: int,
        sample: Float[Tensor, "batch *rest"],
        *,
        generator: Generator | None = None,
    ) -> Float[Tensor, "batch *rest"]:
        """First call: stochastic step from sigma to the log-midpoint. Second: from sigma to sigma_next,
        with the data prediction made at the midpoint."""
        first = state.position(step_index) % 2 == 0
        sigma, sigma_next = self._stage_sigmas(state, step_index)
        # in t = -log(sigma), the first call steps to the midpoint, the second across the whole step
        t, t_next = sigma.log().neg(), sigma_next.log().neg()
        t_mid = t + (t_next - t) * 0.5
        x0 = karras_data_prediction(
            self.prediction_type, model_output, sample, sigma=float(sigma if first else t_mid.neg().exp())
        )
        if sigma_next == 0:  # the last step: Euler to the clean end
            return sample + (sample - x0) / sigma * (sigma_next - sigma)
        tree = state.brownian if state.brownian is not None else self._plant(state, sample, generator)
        if first:
            state.remember(step_index, StepRecord(x0, sample), keep=2)
            start, t_to = sample, t_mid
        else:
            start, t_to = state.recall(step_index - 1, needed_by=step_index).sample, t_next
        # the ancestral split: sigma_down**2 + sigma_up**2 = sigma_to**2 keeps the marginal exact
        sigma_from, sigma_to = t.neg().exp(), t_to.neg().exp()
        sigma_up = torch.minimum(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
        t_down = ((sigma_to**2 - sigma_up**2) ** 0.5).log().neg()
        # the first-order exponential integrator on the data prediction
        prev_sample = (t_down.neg().exp() / t.neg().exp()) * start - (t - t_down).expm1() * x0
        # W over [sigma_to, sigma_from], walked backwards in sigma and normalised to unit variance
        noise = -tree.increment(float(sigma_to), float(sigma_from)) / (sigma_to - sigma_from).abs().sqrt()
        return prev_sample + noise * sigma_up

    def _plant(self, state: SchedulerState, sample: Tensor, generator: Generator | None) -> BrownianTree:
        """The run's Brownian path over the schedule's sigma range, seeded by ``noise_sampler_seed``."""
        seed = self.noise_sampler_seed
        if seed is None:
            # one path for the batch: a list of per-item generators seeds it from the first
            source = generator if generator is None or isinstance(generator, torch.Generator) else generator[0]
            device = None if source is None else source.device
            seed = int(torch.randint(0, 2**63 - 1, (), generator=source, device=device))
        positive = [s for s in state.full_sigmas if s > 0]
        state.brownian = BrownianTree(
            min(positive), max(positive), shape=tuple(sample.shape), dtype=sample.dtype, device=sample.device, seed=seed
        )
        return state.brownian


__all__ = ["DPMSolverSDEScheduler"]
