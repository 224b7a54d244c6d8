"""The guider contract: which predictions a denoising step needs, and how they combine into one.

A guider is a frozen, shareable config value. Per generation call it may hand out mutable state
(:meth:`AbstractGuider.new_state`, e.g. APG's momentum). Each step the denoise loop asks
:meth:`AbstractGuider.passes` which predictions to make, runs them (see
:func:`diffblocks.components.guiders.run.guided_prediction`), and hands them to
:meth:`AbstractGuider.combine`.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, final

from pydantic import BaseModel, ConfigDict, model_validator
from torch import Tensor, nn
from typing_extensions import Self

from diffblocks.components.guiders.perturbations import AbstractPerturbation
from diffblocks.components.guiders.registry import guider_from_config
from diffblocks.components.guiders.rules import is_noop_scale, rescale
from diffblocks.components.hub import resolve_folder

GUIDER_CONFIG_NAME = "guider_config.json"
Condition = Literal["cond", "uncond"]


@final
@dataclass(frozen=True, slots=True)
class GuidancePass:
    """One prediction a step needs: the condition it is made with, and an optional model perturbation.

    Args:
        condition: ``"cond"`` (the prompt) or ``"uncond"`` (the negative or empty prompt).
        perturbation: applied to the denoiser for this prediction only.
    """

    condition: Condition
    perturbation: AbstractPerturbation | None = None


COND = GuidancePass("cond")
UNCOND = GuidancePass("uncond")
COND_ONLY: tuple[GuidancePass, ...] = (COND,)
COND_UNCOND: tuple[GuidancePass, ...] = (COND, UNCOND)


class GuiderState(ABC):  # noqa: B024 - a marker base: states share no behaviour, only the role
    """Mutable state of one generation call (momentum, running averages), made by ``new_state``."""


def describe_shape(shape: Sequence[int | None]) -> str:
    """``shape`` for messages: ``(1, 4, 64, 64)``, ``(1, ?, 64)``, or ``4-D`` when no size is known."""
    if all(size is None for size in shape):
        return f"{len(shape)}-D"
    return "(" + ", ".join("?" if size is None else str(size) for size in shape) + ")"


def in_window(start: float, stop: float, step_index: int, num_steps: int) -> bool:
    """Whether ``step_index`` lies in the steps ``[int(start * num_steps), int(stop * num_steps))``."""
    return int(start * num_steps) <= step_index < int(stop * num_steps)


class AbstractGuider(BaseModel, ABC):
    """A guidance rule: frozen settings, the passes each step needs, and the rule that combines them.

    Field names equal diffusers' guider config keys and class names equal diffusers' ``_class_name``,
    so ``guider_config.json`` folders load in both directions. Concrete guiders are final.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    def new_state(self) -> GuiderState | None:
        """Fresh per-call state, or None when the rule keeps none."""
        return None

    @abstractmethod
    def passes(self, step_index: int, num_steps: int) -> tuple[GuidancePass, ...]:
        """The predictions step ``step_index`` of ``num_steps`` needs, in the order ``combine`` takes them.

        Outside the guidance window, or when the scale makes guidance a no-op, this is only the
        conditional pass.
        """

    @abstractmethod
    def combine(
        self, predictions: Sequence[Tensor], *, state: GuiderState | None, step_index: int, num_steps: int
    ) -> Tensor:
        """The guided prediction from ``predictions``, made in the order ``passes`` gave."""

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError if this guider cannot run on ``model`` (a perturbed layer it lacks).

        Called once per generation call, before any step, by the guidance blocks.
        """

    def check_predictions(self, shape: Sequence[int | None]) -> None:
        """Raise ValueError if predictions of ``shape`` cannot be combined by this rule.

        Args:
            shape: ``(batch, ...)`` of one pass's prediction, e.g. ``(1, 4, 64, 64)`` for a UNet or
                ``(1, 4096, 64)`` for Flux's packed tokens; ``None`` marks a size not known yet.
        """

    def to_config(self) -> dict[str, Any]:
        """JSON-ready settings with ``_class_name``."""
        return {"_class_name": type(self).__name__, **self.model_dump(mode="json")}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        """Build from :meth:`to_config` output or a diffusers ``guider_config.json`` mapping.

        On ``AbstractGuider`` itself the class is looked up by ``_class_name`` in the allowlist.

        Raises:
            ValueError: unknown or mismatched ``_class_name``, unknown keys, or invalid values.
        """
        if cls is AbstractGuider:
            return guider_from_config(config)  # pyright: ignore[reportReturnType]
        name = config.get("_class_name", cls.__name__)
        if name != cls.__name__:
            raise ValueError(f"The config is for {name!r}, not {cls.__name__!r}; load it with guider_from_config.")
        return cls.model_validate({k: v for k, v in config.items() if not k.startswith("_")})

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        """Write ``guider_config.json`` into ``folder`` (created if missing)."""
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        (path / GUIDER_CONFIG_NAME).write_text(json.dumps(self.to_config(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(
        cls, path_or_repo: str | os.PathLike[str], *, subfolder: str | None = None, revision: str | None = None
    ) -> Self:
        """Read ``guider_config.json`` from a folder or a Hub repository (``subfolder="guider"``).

        Raises:
            FileNotFoundError: no folder or no ``guider_config.json``.
            ValueError: as :meth:`from_config`.
        """
        stem = f"{subfolder}/" if subfolder else ""
        folder = resolve_folder(
            path_or_repo, subfolder=subfolder, revision=revision, allow_patterns=[stem + GUIDER_CONFIG_NAME]
        )
        config_path = folder / GUIDER_CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder} has no {GUIDER_CONFIG_NAME}; is it a guider folder?")
        return cls.from_config(json.loads(config_path.read_text()))


class AbstractClassifierFreeGuider(AbstractGuider):
    """Settings shared by the guiders built on classifier-free guidance (Ho & Salimans 2022).

    Args:
        guidance_scale: weight of ``cond - uncond``; 1 (or 0 with the original form) is no guidance.
        guidance_rescale: mix of Lin et al. (2023) std rescaling, 0 (off) to 1.
        use_original_formulation: start from ``cond`` (Ho & Salimans) instead of ``uncond`` (Imagen).
        start: fraction of the steps at which guidance starts.
        stop: fraction of the steps at which guidance stops.
        enabled: False makes every step a single conditional prediction.
    """

    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    use_original_formulation: bool = False
    start: float = 0.0
    stop: float = 1.0
    enabled: bool = True

    @model_validator(mode="after")
    def _check_window(self) -> Self:
        if not 0.0 <= self.start < 1.0:
            raise ValueError(f"start must be in [0, 1), got {self.start}.")
        if not self.start <= self.stop <= 1.0:
            raise ValueError(f"stop must be in [start, 1] = [{self.start}, 1], got {self.stop}.")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale}.")
        return self

    def guides(self, step_index: int, num_steps: int) -> bool:
        """Whether classifier-free guidance acts at this step (enabled, in the window, not a no-op scale)."""
        return (
            self.enabled
            and in_window(self.start, self.stop, step_index, num_steps)
            and not is_noop_scale(self.guidance_scale, use_original_formulation=self.use_original_formulation)
        )

    def passes(self, step_index: int, num_steps: int) -> tuple[GuidancePass, ...]:
        return COND_UNCOND if self.guides(step_index, num_steps) else COND_ONLY

    def _rescaled(self, guided: Tensor, cond: Tensor) -> Tensor:
        return rescale(guided, cond, self.guidance_rescale) if self.guidance_rescale > 0.0 else guided


__all__ = [
    "AbstractClassifierFreeGuider",
    "AbstractGuider",
    "COND",
    "COND_ONLY",
    "COND_UNCOND",
    "Condition",
    "GUIDER_CONFIG_NAME",
    "GuidancePass",
    "GuiderState",
    "UNCOND",
    "describe_shape",
    "in_window",
]
