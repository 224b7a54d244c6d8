"""The scheduler contract: a frozen algorithm + config, and the per-run state it steps.

A scheduler instance holds only its diffusers ``scheduler_config.json`` values, so one instance
can be shared by many pipelines and threads. Everything a run accumulates lives in the
:class:`~diffblocks.components.schedulers.state.SchedulerState` that
:meth:`AbstractScheduler.set_timesteps` returns.
"""

from __future__ import annotations

import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from jaxtyping import Float
from pydantic import BaseModel, ConfigDict, PrivateAttr
from torch import Tensor
from typing_extensions import Self

from diffblocks.components.config_files import read_json_object
from diffblocks.components.hub import resolve_folder
from diffblocks.components.noise import Generator
from diffblocks.components.schedulers.state import SchedulerState, StepRecord, as_floats, strength_begin

MAX_TRAIN_TIMESTEPS = 100_000
"""Most training timesteps a scheduler config may declare (models use 1000): its tables are built eagerly."""

logger = logging.getLogger(__name__)

CONFIG_NAME = "scheduler_config.json"


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

    model_config = ConfigDict(frozen=True, extra="forbid")  # infinities are meaningful here (lambda_min_clipped=-inf)

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
        strength: float,
        device: torch.device | str | None,
    ) -> SchedulerState:
        """A state for the full schedule ``timesteps``/``sigmas`` (CPU), run from :meth:`_begin_index` on.

        The initial noise is unscaled without sigmas, else scaled by :meth:`_init_noise_sigma`.
        """
        begin_index = self._begin_index(num_inference_steps, strength)
        return SchedulerState(
            timesteps=timesteps[begin_index:].to(device),
            sigmas=None if sigmas is None else sigmas[begin_index:],
            init_noise_sigma=1.0 if sigmas is None else self._init_noise_sigma(sigmas),
            num_inference_steps=num_inference_steps,
            begin_index=begin_index,
            full_timesteps=as_floats(timesteps),
            full_sigmas=() if sigmas is None else as_floats(sigmas),
        )

    def _begin_index(self, num_inference_steps: int, strength: float) -> int:
        """First position run for ``strength``, as diffusers' SD pipelines count: ``order`` calls per skipped step."""
        return strength_begin(num_inference_steps, strength) * self.order

    def _init_noise_sigma(self, sigmas: Tensor) -> float:
        """Scale of the initial noise of the schedule ``sigmas``: 1 for a variance-preserving process."""
        return 1.0

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
        values = {k: _json_value(v) for k, v in dump.items()}
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


def _json_value(value: Any) -> Any:
    """Tuples (frozen lists) back to JSON lists."""
    return [_json_value(v) for v in cast(tuple[Any, ...], value)] if isinstance(value, tuple) else value


def read_config(folder: Path) -> dict[str, Any]:
    """The ``scheduler_config.json`` of ``folder`` as a dict."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; is it a diffusers scheduler folder?")
    return read_json_object(path, what="a scheduler config")


__all__ = ["CONFIG_NAME", "MAX_TRAIN_TIMESTEPS", "AbstractScheduler", "SchedulerState", "StepRecord", "read_config"]
