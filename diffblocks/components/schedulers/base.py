"""The scheduler contract: a frozen algorithm + config, and the per-run state it steps.

A scheduler instance holds only its diffusers ``scheduler_config.json`` values, so one instance
can be shared by many pipelines and threads. Everything a run accumulates (the schedule, the
solver's memory of earlier steps) lives in the :class:`SchedulerState` that
:meth:`AbstractScheduler.set_timesteps` returns.
"""

from __future__ import annotations

import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from pydantic import BaseModel, ConfigDict, PrivateAttr
from torch import Tensor
from typing_extensions import Self

from diffblocks.components.hub import resolve_folder
from diffblocks.components.noise import Generator

logger = logging.getLogger(__name__)

CONFIG_NAME = "scheduler_config.json"

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
    """

    timesteps: Tensor
    sigmas: Tensor | None
    init_noise_sigma: float
    num_inference_steps: int
    begin_index: int
    full_timesteps: tuple[float, ...]
    full_sigmas: tuple[float, ...] = ()
    history: dict[int, StepRecord] = field(default_factory=dict[int, StepRecord])

    def position(self, step_index: int) -> int:
        """Index into the untruncated schedule of step ``step_index`` of this run."""
        if not 0 <= step_index < len(self.timesteps):
            raise ValueError(f"step_index {step_index} is outside this schedule of {len(self.timesteps)} steps.")
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


class AbstractScheduler(BaseModel, ABC):
    """A sampling algorithm configured by its diffusers ``scheduler_config.json``; holds no run state.

    Fields are the diffusers config keys of the class of the same name, with its defaults.
    Concrete schedulers are final.

    Class attributes:
        order: model calls per step of the underlying solver (2 for Heun); ``strength`` skips
            ``order`` timesteps per skipped step.
        fixed_config: diffusers keys supported at one value only; another value raises.
        extension_keys: fields that are not diffusers config keys (such as DDIM's ``eta``);
            :meth:`to_config` writes them only when set explicitly.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    order: ClassVar[int] = 1
    fixed_config: ClassVar[Mapping[str, object]] = {}
    extension_keys: ClassVar[frozenset[str]] = frozenset()

    # config keys this class does not read, kept so a swap to another class keeps them
    # (e.g. ``clip_sample`` in SD1.5's PNDM config matters to DDIM), as diffusers does
    _hidden_config: dict[str, Any] = PrivateAttr(default_factory=dict[str, Any])

    @abstractmethod
    def set_timesteps(
        self,
        num_inference_steps: int,
        *,
        device: torch.device | str | None = None,
        strength: float = 1.0,
        mu: float | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> SchedulerState:
        """Build the schedule of one run.

        Args:
            num_inference_steps: denoising steps of the full (untruncated) schedule.
            device: where ``state.timesteps`` lives.
            strength: fraction of the schedule to run, from its clean end (image-to-image).
            mu: resolution-dependent shift, for schedulers with ``use_dynamic_shifting``.
            sigmas: a custom noise schedule, for schedulers that take one.
        """

    def scale_model_input(
        self, state: SchedulerState, sample: Float[Tensor, "batch *rest"], step_index: int
    ) -> Float[Tensor, "batch *rest"]:
        """The sample as the model expects it at step ``step_index``.

        The identity here; variance-exploding schedulers (Euler, Heun, LMS) divide by
        ``sqrt(sigma**2 + 1)``.
        """
        return sample

    @abstractmethod
    def step(
        self,
        state: SchedulerState,
        model_output: Float[Tensor, "batch *rest"],
        step_index: int,
        sample: Float[Tensor, "batch *rest"],
        *,
        generator: Generator | None = None,
    ) -> Float[Tensor, "batch *rest"]:
        """Advance ``sample`` from step ``step_index`` to the next noise level.

        Args:
            state: the run's state from :meth:`set_timesteps`; multistep memory is updated.
            model_output: the model's prediction at ``state.timesteps[step_index]``.
            step_index: position in ``state.timesteps``.
            sample: the current noisy sample.
            generator: seeds the fresh noise of stochastic samplers.
        """

    @abstractmethod
    def add_noise(
        self,
        state: SchedulerState,
        original: Float[Tensor, "batch *rest"],
        noise: Float[Tensor, "batch *rest"],
        step_index: int,
    ) -> Float[Tensor, "batch *rest"]:
        """Noise clean ``original`` to the level of ``state.timesteps[step_index]``."""

    def _check_request(
        self,
        num_inference_steps: int,
        *,
        limit: int | None = None,
        mu: float | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> None:
        """Reject a step count outside ``[1, limit]``, and ``mu``/``sigmas`` given to a scheduler that ignores them."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        if limit is not None and num_inference_steps > limit:
            raise ValueError(f"num_inference_steps {num_inference_steps} exceeds num_train_timesteps {limit}.")
        if mu is not None:
            raise ValueError(f"{type(self).__name__} takes no mu (got {mu}); it has no dynamic shifting.")
        if sigmas is not None:
            raise ValueError(f"{type(self).__name__} takes no custom sigmas.")

    def _build_state(
        self,
        timesteps: Tensor,
        sigmas: Tensor | None,
        *,
        num_inference_steps: int,
        begin_index: int,
        init_noise_sigma: float,
        device: torch.device | str | None,
    ) -> SchedulerState:
        """A state for the full schedule ``timesteps``/``sigmas`` (CPU), run from ``begin_index`` on."""
        return SchedulerState(
            timesteps=timesteps[begin_index:].to(device),
            sigmas=None if sigmas is None else sigmas[begin_index:],
            init_noise_sigma=init_noise_sigma,
            num_inference_steps=num_inference_steps,
            begin_index=begin_index,
            full_timesteps=tuple(timesteps.tolist()),
            full_sigmas=() if sigmas is None else tuple(sigmas.tolist()),
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        """Build from a diffusers ``scheduler_config.json`` mapping (possibly another class's).

        Keys starting with ``_`` and keys listed in ``_use_default_values`` are skipped; keys this
        class does not read are kept aside (see :meth:`to_config`); ``null`` for a key whose
        default is not ``null`` means the default.

        Raises:
            ValueError: a value is invalid, or a key is set to a value this implementation does
                not support.
        """
        defaulted = set(config.get("_use_default_values", ()))
        values: dict[str, Any] = {}
        hidden: dict[str, Any] = {}
        for key, value in config.items():
            if key.startswith("_") or key in defaulted:
                continue
            if key in cls.model_fields:
                if value is not None or cls.model_fields[key].default is None:
                    values[key] = value
            elif key in cls.fixed_config:
                if value is not None and value != cls.fixed_config[key]:
                    raise ValueError(
                        f"{cls.__name__} does not support {key}={value!r} (only {cls.fixed_config[key]!r})."
                    )
            else:
                logger.debug("%s does not read config key %s=%r", cls.__name__, key, value)
                hidden[key] = value
        scheduler = cls.model_validate(values)
        scheduler._hidden_config = hidden
        return scheduler

    def to_config(self) -> dict[str, Any]:
        """The diffusers-compatible config: ``_class_name``, every key, and the keys left at default.

        ``_use_default_values`` lists keys never set explicitly, so that loading this config into
        another scheduler class gives that class's defaults for them, as in diffusers.
        """
        unset = set(type(self).model_fields) - self.model_fields_set
        dump = self.model_dump(exclude=unset & self.extension_keys)
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in dump.items()}
        defaulted = sorted(unset - self.extension_keys)
        return {
            **self._hidden_config,
            "_class_name": type(self).__name__,
            **self.fixed_config,
            **values,
            "_use_default_values": defaulted,
        }

    def replace(self, **changes: Any) -> Self:
        """A validated copy with ``changes`` applied (``scheduler.replace(use_karras_sigmas=True)``)."""
        config = {k: v for k, v in self.to_config().items() if k != "_use_default_values"}
        defaulted = set(type(self).model_fields) - self.model_fields_set - set(changes)
        return type(self).from_config({**config, **changes, "_use_default_values": sorted(defaulted)})

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike[str],
        *,
        subfolder: str | None = None,
        revision: str | None = None,
    ) -> Self:
        """Load ``scheduler_config.json`` from a folder or a Hub repository (``subfolder="scheduler"``).

        Raises:
            FileNotFoundError: the folder or the config file is missing.
        """
        pattern = f"{subfolder}/{CONFIG_NAME}" if subfolder else CONFIG_NAME
        folder = resolve_folder(path_or_repo, subfolder=subfolder, revision=revision, allow_patterns=[pattern])
        return cls.from_config(read_config(folder))

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        """Write ``scheduler_config.json`` (as diffusers writes it) into ``folder``, created if missing."""
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in self.to_config().items() if k != "_use_default_values"}
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_config(folder: Path) -> dict[str, Any]:
    """The ``scheduler_config.json`` of ``folder`` as a dict."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; is it a diffusers scheduler folder?")
    config: dict[str, Any] = json.loads(path.read_text())
    return config


__all__ = [
    "CONFIG_NAME",
    "AbstractScheduler",
    "SchedulerState",
    "StepRecord",
    "flow_strength_begin",
    "read_config",
    "strength_begin",
]
