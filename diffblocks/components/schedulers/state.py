"""The state of one sampling run: its schedule and the solver's memory of earlier steps.

A scheduler is immutable and shared; everything a run accumulates lives in a
:class:`SchedulerState`, so two runs on one scheduler never interfere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from torch import Tensor

from diffblocks.components.schedulers.brownian import BrownianTree

_MSG_OUT_OF_ORDER = (
    "step {index} needs what step {needed} produced, but step {needed} has not run on this state. "
    "Run the steps in order on one SchedulerState (call set_timesteps again to start over)."
)


@dataclass(frozen=True)
class StepRecord:
    """What a multistep solver keeps from one step.

    Args:
        output: the model output in the form the solver reuses (a data prediction, a derivative,
            or the raw noise prediction), shaped like the sample.
        sample: the sample that step started from.
    """

    output: Tensor
    sample: Tensor


@dataclass(eq=False)
class SchedulerState:
    """The schedule of one sampling run and the solver's memory of its earlier steps.

    ``timesteps`` lists what the denoise loop runs: ``for i, t in enumerate(state.timesteps)``, then
    ``scheduler.step(state, output, i, sample)``. Its length is the number of model calls, which is
    ``num_inference_steps`` for most schedulers, ``2 * n - 1`` for Heun and ``n + 1`` for PNDM.

    Args:
        timesteps: model timesteps of the steps to run, after ``strength`` truncation.
        sigmas: noise levels aligned with ``timesteps`` plus the final level, on the CPU; None for
            schedulers parameterised by alpha-bar (DDPM, DDIM, PNDM).
        init_noise_sigma: scale of the initial Gaussian noise for text-to-image.
        num_inference_steps: steps requested from ``set_timesteps``, before truncation.
        begin_index: position of ``timesteps[0]`` in the untruncated schedule.
        full_timesteps: every timestep of the untruncated schedule, as Python numbers.
        full_sigmas: every noise level of the untruncated schedule plus the final one, as floats.
        history: records of earlier steps, keyed by step index (multistep solvers only).
        brownian: the Brownian path of an SDE sampler that queries one (DPM-Solver SDE), built
            at its first step from the sample's shape.
    """

    timesteps: Tensor
    sigmas: Tensor | None
    init_noise_sigma: float
    num_inference_steps: int
    begin_index: int
    full_timesteps: tuple[float, ...]
    full_sigmas: tuple[float, ...] = ()
    history: dict[int, StepRecord] = field(default_factory=dict[int, StepRecord])
    brownian: BrownianTree | None = None

    def position(self, step_index: int) -> int:
        """Index into the untruncated schedule of step ``step_index`` of this run."""
        steps = len(self.full_timesteps) - self.begin_index  # len(self.timesteps), without a tensor call
        if not 0 <= step_index < steps:
            raise ValueError(f"step_index {step_index} is outside this schedule of {steps} steps.")
        return self.begin_index + step_index

    def remember(self, step_index: int, record: StepRecord, *, keep: int = 4) -> None:
        """Store ``record`` for ``step_index``; records older than ``keep`` steps are dropped.

        Records are keyed by index, so running a step again replaces its record instead of
        shifting the solver's memory.
        """
        self.history[step_index] = record
        for old in [k for k in self.history if k <= step_index - keep]:
            del self.history[old]

    def recall(self, step_index: int, *, needed_by: int) -> StepRecord:
        """The record of step ``step_index``; a ValueError when that step has not run."""
        record = self.history.get(step_index)
        if record is None:
            raise ValueError(_MSG_OUT_OF_ORDER.format(index=needed_by, needed=step_index))
        return record


def as_floats(values: Tensor) -> tuple[float, ...]:
    """The values of a 1-D tensor as Python numbers (cheap to read per step, no device sync)."""
    return tuple(cast(list[float], values.tolist()))


def strength_begin(num_inference_steps: int, strength: float) -> int:
    """First kept step for image-to-image, as diffusers' SD/SDXL pipelines compute it.

    ``int(steps * strength)`` steps are kept; the rest are skipped from the noisy end.
    """
    _check_strength(strength)
    kept = min(int(num_inference_steps * strength), num_inference_steps)
    if kept < 1:
        raise ValueError(
            f"strength {strength} keeps int({num_inference_steps} * {strength}) = {kept} of "
            f"{num_inference_steps} steps; raise strength or num_inference_steps."
        )
    return num_inference_steps - kept


def flow_strength_begin(num_inference_steps: int, strength: float) -> int:
    """First kept step for image-to-image, as diffusers' flow-matching pipelines (Flux, SD3) compute it.

    Unlike :func:`strength_begin`, the skipped count is rounded down rather than the kept count.
    """
    _check_strength(strength)
    begin = int(max(num_inference_steps - num_inference_steps * strength, 0))
    if begin >= num_inference_steps:
        raise ValueError(f"strength {strength} leaves none of {num_inference_steps} steps to run.")
    return begin


def _check_strength(strength: float) -> None:
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}.")


__all__ = ["SchedulerState", "StepRecord", "as_floats", "flow_strength_begin", "strength_begin"]
