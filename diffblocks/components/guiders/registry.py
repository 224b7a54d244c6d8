"""The allowlist of guider classes a ``_class_name`` in a config may name."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from diffblocks.components.guiders.adaptive_projected import AdaptiveProjectedGuidance
from diffblocks.components.guiders.auto_guidance import AutoGuidance
from diffblocks.components.guiders.base import AbstractGuider
from diffblocks.components.guiders.cfg_zero_star import ClassifierFreeZeroStarGuidance
from diffblocks.components.guiders.classifier_free import ClassifierFreeGuidance
from diffblocks.components.guiders.frequency_decoupled import FrequencyDecoupledGuidance
from diffblocks.components.guiders.magnitude_aware import MagnitudeAwareGuidance
from diffblocks.components.guiders.perturbed_attention import PerturbedAttentionGuidance
from diffblocks.components.guiders.skip_layer import SkipLayerGuidance
from diffblocks.components.guiders.smoothed_energy import SmoothedEnergyGuidance
from diffblocks.components.guiders.tangential import TangentialClassifierFreeGuidance

_BUILT_IN: tuple[type[AbstractGuider], ...] = (
    ClassifierFreeGuidance,
    ClassifierFreeZeroStarGuidance,
    AdaptiveProjectedGuidance,
    TangentialClassifierFreeGuidance,
    PerturbedAttentionGuidance,
    SkipLayerGuidance,
    SmoothedEnergyGuidance,
    AutoGuidance,
    FrequencyDecoupledGuidance,
    MagnitudeAwareGuidance,
)
_GUIDERS: dict[str, type[AbstractGuider]] = {cls.__name__: cls for cls in _BUILT_IN}

GUIDERS: Mapping[str, type[AbstractGuider]] = MappingProxyType(_GUIDERS)
"""Guider classes by ``_class_name`` (diffusers' names); read-only, extended by :func:`register_guider`."""


def register_guider(cls: type[AbstractGuider]) -> type[AbstractGuider]:
    """Allow configs to name ``cls`` (usable as a class decorator).

    Raises:
        ValueError: another class is registered under the same name.
    """
    known = _GUIDERS.get(cls.__name__)
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
    cls = _GUIDERS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"Unknown guider {name!r}; known guiders: {', '.join(sorted(_GUIDERS))}.")
    return cls.from_config(config)


__all__ = ["GUIDERS", "guider_from_config", "register_guider"]
