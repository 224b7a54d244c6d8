"""The allowlist of guider classes a ``_class_name`` in a config may name.

The built-in guiders are listed by module path and imported on first lookup, so this module
imports no guider: :meth:`AbstractGuider.from_config <diffblocks.components.guiders.base.AbstractGuider.from_config>`
uses it from the guiders' base without an import cycle.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffblocks.components.guiders.base import AbstractGuider

_BUILT_IN = {
    "ClassifierFreeGuidance": "classifier_free",
    "ClassifierFreeZeroStarGuidance": "cfg_zero_star",
    "AdaptiveProjectedGuidance": "adaptive_projected",
    "TangentialClassifierFreeGuidance": "tangential",
    "PerturbedAttentionGuidance": "perturbed_attention",
    "SkipLayerGuidance": "skip_layer",
    "SmoothedEnergyGuidance": "smoothed_energy",
    "AutoGuidance": "auto_guidance",
    "FrequencyDecoupledGuidance": "frequency_decoupled",
    "MagnitudeAwareGuidance": "magnitude_aware",
}
# a class, or the module of diffblocks.components.guiders that defines the built-in of that name
_GUIDERS: dict[str, type[AbstractGuider] | str] = dict(_BUILT_IN)


class _Allowlist(Mapping[str, "type[AbstractGuider]"]):
    """Read-only view of the allowlist that imports a built-in guider's module when it is first looked up."""

    def __getitem__(self, name: str) -> type[AbstractGuider]:
        target = _GUIDERS[name]
        if isinstance(target, str):
            target = getattr(importlib.import_module(f"diffblocks.components.guiders.{target}"), name)
            _GUIDERS[name] = target
        return target

    def __iter__(self) -> Iterator[str]:
        return iter(_GUIDERS)

    def __len__(self) -> int:
        return len(_GUIDERS)


GUIDERS: Mapping[str, type[AbstractGuider]] = _Allowlist()
"""Guider classes by ``_class_name`` (diffusers' names); read-only, extended by :func:`register_guider`."""


def register_guider(cls: type[AbstractGuider]) -> type[AbstractGuider]:
    """Allow configs to name ``cls`` (usable as a class decorator).

    Raises:
        ValueError: another class is registered under the same name.
    """
    known = GUIDERS.get(cls.__name__)
    if known is not None and known is not cls:
        raise ValueError(f"A guider named {cls.__name__!r} is already registered ({known.__module__}).")
    _GUIDERS[cls.__name__] = cls
    return cls


def guider_from_config(config: Mapping[str, Any]) -> AbstractGuider:
    """Build the guider a config names by ``_class_name``.

    Raises:
        ValueError: the name is missing or not registered (the message lists the known ones), or
            the settings are invalid.
    """
    name = config.get("_class_name")
    cls = GUIDERS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"Unknown guider {name!r}; known guiders: {', '.join(sorted(GUIDERS))}.")
    return cls.from_config(config)


__all__ = ["GUIDERS", "guider_from_config", "register_guider"]
