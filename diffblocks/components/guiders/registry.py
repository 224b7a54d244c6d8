"""The allowlist of guider classes a ``_class_name`` in a config may name.

The built-in guiders are listed by module path and imported on first lookup, so this module
imports no guider: :meth:`AbstractGuider.from_config <diffblocks.components.guiders.base.AbstractGuider.from_config>`
uses it from the guiders' base without an import cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from diffblocks.registry.allowlist import ConfigAllowlist

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
GUIDERS: ConfigAllowlist[AbstractGuider] = ConfigAllowlist("guider", _BUILT_IN, package="diffblocks.components.guiders")
"""Guider classes by ``_class_name`` (diffusers' names); read-only, extended by :func:`register_guider`."""


def register_guider(cls: type[AbstractGuider]) -> type[AbstractGuider]:
    """Allow configs to name ``cls`` (usable as a class decorator).

    Raises:
        ValueError: another class is registered under the same name.
    """
    return GUIDERS.register(cls)


def guider_from_config(config: Mapping[str, Any]) -> AbstractGuider:
    """Build the guider a config names by ``_class_name``.

    Raises:
        ValueError: the name is missing or not registered (the message lists the known ones), or
            the settings are invalid.
    """
    return GUIDERS.from_config(config)


__all__ = ["GUIDERS", "guider_from_config", "register_guider"]
