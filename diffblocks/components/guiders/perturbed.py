"""Bases of the guiders that guide away from a perturbed ("worse") version of the denoiser.

Layers are given per model family (``family="sdxl"``) or as explicit diffusers module paths; the
perturbation is built once, at construction. Diffusers configs that name layers by index
(``skip_layer_guidance_layers=[7, 8]``) or by ``LayerSkipConfig`` dicts (``fqn`` and ``indices``)
are read too; an index without ``fqn`` means ``transformer_blocks.<index>``. Configs are written
in the dict form (:mod:`~diffblocks.components.guiders.layer_configs`) so diffusers can load them.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, PrivateAttr, model_validator
from torch import Tensor, nn
from typing_extensions import Self

from diffblocks.components.guiders.base import (
    COND,
    UNCOND,
    AbstractClassifierFreeGuider,
    GuidancePass,
    GuiderState,
)
from diffblocks.components.guiders.families import CONDITION_SETTINGS, FAMILIES, LAYER_STACKS, Family
from diffblocks.components.guiders.layer_configs import (
    DEFAULT_STACK,
    Stack,
    paths_of_stacks,
    stacks_from_configs,
    stacks_of_paths,
)
from diffblocks.components.guiders.perturbations import AbstractPerturbation
from diffblocks.components.guiders.rules import guide


def _as_paths(value: Any) -> Any:
    """Accept one path, diffusers block indices, or a sequence of either (pydantic checks the result)."""
    if value is None:
        return None
    items: list[Any] = [value] if isinstance(value, (str, int)) else list(value)
    return tuple(f"{DEFAULT_STACK}.{item}" if isinstance(item, int) else item for item in items)


def _plain_paths(value: Any) -> tuple[str, ...] | None:
    """``value`` as module paths when it is a valid layers value, else None (pydantic reports it)."""
    if not isinstance(value, (str, int, list, tuple)):
        return None
    paths = _as_paths(value)
    return paths if all(isinstance(path, str) for path in paths) else None


LayerPaths = Annotated[tuple[str, ...] | None, BeforeValidator(_as_paths)]


class AbstractPerturbedGuider(AbstractClassifierFreeGuider):
    """CFG settings plus a model perturbation on family-default or explicit layers.

    Concrete classes name their layers field (``layers_field``), the diffusers key of its
    ``LayerSkipConfig`` form (``layer_config_key``), the per-family defaults (layers, and the
    settings a family implies unless given), and build the perturbation from the resolved paths.

    Args:
        family: ``"sd15"``, ``"sdxl"``, ``"flux"`` or ``"tiny"``: use that family's default layers
            and settings (on ``"flux"``: no classifier-free guidance, see
            :mod:`~diffblocks.components.guiders.families`).
    """

    layers_field: ClassVar[str]
    layer_config_key: ClassVar[str]
    default_layers: ClassVar[dict[str, tuple[str, ...]]]
    family_settings: ClassVar[Mapping[str, Mapping[str, object]]] = CONDITION_SETTINGS

    family: Family | None = None
    _perturbation: AbstractPerturbation = PrivateAttr()

    @classmethod
    def for_family(cls, family: Family, **settings: Any) -> Self:
        """This guider with ``family``'s default layers and settings, overridden by ``settings``."""
        return cls(family=family, **settings)

    @model_validator(mode="before")
    @classmethod
    def _fill_family_settings(cls, data: Any) -> Any:
        family = data.get("family") if isinstance(data, dict) else None
        if not isinstance(family, str) or family not in cls.family_settings:
            return data
        return {**cls.family_settings[family], **data}  # pyright: ignore[reportUnknownArgumentType]

    @model_validator(mode="before")
    @classmethod
    def _read_layers(cls, data: Any) -> Any:
        """Read a diffusers layer config as module paths; layers written as the family default are it."""
        if not isinstance(data, dict):
            return data
        values: dict[str, Any] = dict(data)  # pyright: ignore[reportUnknownArgumentType] - pydantic's raw input
        configs = values.pop(cls.layer_config_key, None)
        written: tuple[Stack, ...] | None = None
        if configs is not None:
            if values.get(cls.layers_field) is not None:
                raise ValueError(f"Give {cls.layers_field} or {cls.layer_config_key}, not both.")
            written, dropout = stacks_from_configs(configs)
            values[cls.layers_field] = paths_of_stacks(written)
            if dropout is not None and "dropout" in cls.model_fields:
                values.setdefault("dropout", dropout)
        family, layers = values.get("family"), _plain_paths(values.get(cls.layers_field))
        if layers is not None and isinstance(family, str) and family in cls.default_layers:
            containers = LAYER_STACKS[family]
            written = written or stacks_of_paths(layers, containers=containers)
            if written is not None and written == stacks_of_paths(cls.default_layers[family], containers=containers):
                values[cls.layers_field] = None  # the family default, however it was spelt
        return values

    @model_validator(mode="after")
    def _build_perturbation(self) -> Self:
        layers: tuple[str, ...] | None = getattr(self, self.layers_field)
        if layers is None:
            if self.family is None:
                raise ValueError(
                    f"{type(self).__name__} needs family= (one of {list(FAMILIES)}) or explicit "
                    f"{self.layers_field}= module paths, e.g. {type(self).__name__}.for_family('sdxl')."
                )
            layers = self.default_layers[self.family]
        self._perturbation = self.make_perturbation(layers)
        return self

    @property
    def perturbation(self) -> AbstractPerturbation:
        """The perturbation applied to the guiding prediction."""
        return self._perturbation

    def check_model(self, model: nn.Module) -> None:
        """Resolve the perturbed layers in ``model`` now, so a wrong path fails before the first step.

        Raises:
            ValueError: a layer path names no suitable submodule; the message names the field.
        """
        try:
            self.perturbation.resolve(model)
        except ValueError as err:
            given = getattr(self, self.layers_field) is not None
            source = self.layers_field if given else f"the {self.family!r} family's default layers"
            raise ValueError(
                f"{type(self).__name__} {source}: {err} Fix: name layers this model has with "
                f"{self.layers_field}=[...]."
            ) from err

    @abstractmethod
    def make_perturbation(self, layers: tuple[str, ...]) -> AbstractPerturbation:
        """The perturbation of ``layers`` with this guider's settings."""

    @abstractmethod
    def layer_config_settings(self) -> dict[str, object]:
        """Keys besides ``fqn`` and ``indices`` of each dict written under ``layer_config_key``."""

    def layer_stacks(self) -> tuple[Stack, ...] | None:
        """The perturbed layers as diffusers names them (block lists and indices), or None if it cannot.

        Family defaults always have this form; a family's container paths (a UNet mid block) are
        mapped to indices by its released architecture (:data:`~diffblocks.components.guiders.families.LAYER_STACKS`).
        Explicit paths have it when each ends in a block index.
        """
        given: tuple[str, ...] | None = getattr(self, self.layers_field)
        layers = self.perturbation.targets if given is None else given
        return stacks_of_paths(layers, containers=LAYER_STACKS[self.family] if self.family else {})

    def to_config(self) -> dict[str, Any]:
        """JSON-ready settings; the layers are written under ``layer_config_key`` in diffusers' form.

        Layers without that form (an attention layer inside a block, a block list outside a family)
        stay module paths under ``layers_field``, which only diffblocks can apply.
        """
        config = super().to_config()
        stacks = self.layer_stacks()
        if stacks is not None:
            extra = self.layer_config_settings()
            config[self.layers_field] = None
            config[self.layer_config_key] = [{"fqn": fqn, "indices": list(idx), **extra} for fqn, idx in stacks]
        return config


class AbstractPerturbedConditionGuider(AbstractPerturbedGuider):
    """CFG plus guidance away from a perturbed conditional prediction (PAG, SLG, SEG).

    ``uncond + s * (cond - uncond) + s_p * (cond - perturbed)`` when both act; the perturbed term
    acts on steps ``int(start_p * n) < i < int(stop_p * n)``. The lower bound is exclusive, as in
    diffusers, so the same settings give the same images. ``s_p`` must be >= 0: a negative weight
    would guide towards the perturbed ("worse") model, which the method never intends.
    """

    perturbed_fields: ClassVar[tuple[str, str, str]]
    """Names of the ``(scale, start, stop)`` fields of the perturbed term."""

    _with_uncond: tuple[GuidancePass, ...] = PrivateAttr()
    _without_uncond: tuple[GuidancePass, ...] = PrivateAttr()

    @model_validator(mode="after")
    def _build_passes(self) -> Self:
        scale, start, stop = self.perturbed_settings()
        scale_field, start_field, stop_field = self.perturbed_fields
        if scale < 0.0:
            raise ValueError(
                f"{scale_field} must be >= 0 (0 turns the perturbed term off), got {scale}: a negative "
                "scale guides towards the perturbed model."
            )
        if not 0.0 <= start < 1.0 or not start <= stop <= 1.0:
            raise ValueError(
                f"The perturbed-guidance window needs 0 <= {start_field} < 1 and {start_field} <= {stop_field} <= 1, "
                f"got [{start}, {stop}]."
            )
        perturbed = GuidancePass("cond", self.perturbation)
        self._with_uncond = (COND, UNCOND, perturbed)
        self._without_uncond = (COND, perturbed)
        return self

    def perturbed_settings(self) -> tuple[float, float, float]:
        """``(scale, start, stop)`` of the perturbed-guidance term."""
        scale, start, stop = (float(getattr(self, name)) for name in self.perturbed_fields)
        return scale, start, stop

    def perturbs(self, step_index: int, num_steps: int) -> bool:
        """Whether the perturbed-guidance term acts at this step."""
        scale, start, stop = self.perturbed_settings()
        return (
            self.enabled
            and int(start * num_steps) < step_index < int(stop * num_steps)
            and not math.isclose(scale, 0.0)
        )

    def passes(self, step_index: int, num_steps: int) -> tuple[GuidancePass, ...]:
        if not self.perturbs(step_index, num_steps):
            return super().passes(step_index, num_steps)
        return self._with_uncond if self.guides(step_index, num_steps) else self._without_uncond

    def combine(
        self, predictions: Sequence[Tensor], *, state: GuiderState | None, step_index: int, num_steps: int
    ) -> Tensor:
        scale, original = self.guidance_scale, self.use_original_formulation
        cfg, perturbed = self.guides(step_index, num_steps), self.perturbs(step_index, num_steps)
        if not perturbed:
            if not cfg:
                return predictions[0]
            cond, uncond = predictions
            guided = guide(cond, uncond, scale, use_original_formulation=original)
        elif cfg:
            cond, uncond, worse = predictions
            guided = guide(cond, uncond, scale, use_original_formulation=original)
            guided = guided + self.perturbed_settings()[0] * (cond - worse)
        else:
            cond, worse = predictions
            guided = guide(cond, worse, self.perturbed_settings()[0], use_original_formulation=original)
        return self._rescaled(guided, cond)


__all__ = ["AbstractPerturbedConditionGuider", "AbstractPerturbedGuider", "LayerPaths"]
