"""Guiders: which predictions each denoising step makes, and how they combine into one.

One guider per file; the perturbations that PAG, SLG, SEG and auto-guidance apply to the denoiser,
one pass at a time, live in :mod:`~diffblocks.components.guiders.perturbations`.
"""

from diffblocks.components.guiders.adaptive_projected import AdaptiveProjectedGuidance, MomentumState
from diffblocks.components.guiders.auto_guidance import AutoGuidance
from diffblocks.components.guiders.base import (
    GUIDER_CONFIG_NAME,
    AbstractClassifierFreeGuider,
    AbstractGuider,
    GuidancePass,
    GuiderState,
)
from diffblocks.components.guiders.cfg_zero_star import ClassifierFreeZeroStarGuidance
from diffblocks.components.guiders.classifier_free import ClassifierFreeGuidance
from diffblocks.components.guiders.families import FAMILIES, Family
from diffblocks.components.guiders.frequency_decoupled import FrequencyDecoupledGuidance
from diffblocks.components.guiders.magnitude_aware import MagnitudeAwareGuidance
from diffblocks.components.guiders.perturbations import (
    AbstractPerturbation,
    IdentityAttention,
    SkipBlocks,
    SmoothedQueries,
    detach_perturbations,
)
from diffblocks.components.guiders.perturbed import AbstractPerturbedConditionGuider, AbstractPerturbedGuider
from diffblocks.components.guiders.perturbed_attention import PerturbedAttentionGuidance
from diffblocks.components.guiders.registry import GUIDERS, guider_from_config, register_guider
from diffblocks.components.guiders.run import GuidanceConditions, guided_prediction
from diffblocks.components.guiders.skip_layer import SkipLayerGuidance
from diffblocks.components.guiders.smoothed_energy import SmoothedEnergyGuidance
from diffblocks.components.guiders.tangential import TangentialClassifierFreeGuidance

__all__ = [
    "FAMILIES",
    "GUIDERS",
    "GUIDER_CONFIG_NAME",
    "AbstractClassifierFreeGuider",
    "AbstractGuider",
    "AbstractPerturbation",
    "AbstractPerturbedConditionGuider",
    "AbstractPerturbedGuider",
    "AdaptiveProjectedGuidance",
    "AutoGuidance",
    "ClassifierFreeGuidance",
    "ClassifierFreeZeroStarGuidance",
    "Family",
    "FrequencyDecoupledGuidance",
    "GuidanceConditions",
    "GuidancePass",
    "GuiderState",
    "IdentityAttention",
    "MagnitudeAwareGuidance",
    "MomentumState",
    "PerturbedAttentionGuidance",
    "SkipBlocks",
    "SkipLayerGuidance",
    "SmoothedEnergyGuidance",
    "SmoothedQueries",
    "TangentialClassifierFreeGuidance",
    "detach_perturbations",
    "guided_prediction",
    "guider_from_config",
    "register_guider",
]
