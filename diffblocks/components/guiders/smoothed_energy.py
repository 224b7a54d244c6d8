"""Smoothed-energy guidance (SEG): guide away from the model with blurred self-attention energy."""

from __future__ import annotations

from typing import ClassVar, final

from diffblocks.components.guiders.families import ATTENTION_LAYERS
from diffblocks.components.guiders.perturbations import SmoothedQueries
from diffblocks.components.guiders.perturbed import AbstractPerturbedConditionGuider, LayerPaths


@final
class SmoothedEnergyGuidance(AbstractPerturbedConditionGuider):
    """Smoothed-energy guidance, Hong (2024), arXiv:2408.00760.

    A third prediction is made with the self-attention queries of chosen layers blurred by a
    Gaussian over the image grid (equivalently, the attention energy is smoothed; the paper's
    infinite blur, the default, replaces every query by their mean), and
    ``uncond + s * (cond - uncond) + s_seg * (cond - cond_smoothed)`` is returned.

    Diffusers 0.42.1 swaps the infinite and finite branches of its blur; this follows the paper.

    Args:
        seg_guidance_scale: ``s_seg``.
        seg_blur_sigma: Gaussian standard deviation in tokens; above ``seg_blur_threshold_inf`` the
            blur is infinite (the query mean).
        seg_blur_threshold_inf: see ``seg_blur_sigma``.
        seg_guidance_start: fraction of the steps after which SEG acts.
        seg_guidance_stop: fraction of the steps at which SEG stops.
        seg_guidance_layers: attention layers, or blocks holding self-attention; defaults to the
            ``family``'s (``mid_block`` for SD and SDXL).
        family: ``"sd15"``, ``"sdxl"``, ``"flux"`` or ``"tiny"``.
        (other fields): as :class:`~diffblocks.components.guiders.base.AbstractClassifierFreeGuider`.
    """

    layers_field: ClassVar[str] = "seg_guidance_layers"
    perturbed_fields: ClassVar[tuple[str, str, str]] = (
        "seg_guidance_scale", "seg_guidance_start", "seg_guidance_stop",
    )
    layer_config_key: ClassVar[str] = "seg_guidance_config"
    default_layers: ClassVar[dict[str, tuple[str, ...]]] = dict(ATTENTION_LAYERS)

    seg_guidance_scale: float = 2.8
    seg_blur_sigma: float = 9999999.0
    seg_blur_threshold_inf: float = 9999.0
    seg_guidance_start: float = 0.0
    seg_guidance_stop: float = 1.0
    seg_guidance_layers: LayerPaths = None

    def make_perturbation(self, layers: tuple[str, ...]) -> SmoothedQueries:
        return SmoothedQueries(layers, blur_sigma=self.seg_blur_sigma, blur_threshold_inf=self.seg_blur_threshold_inf)

    def layer_config_settings(self) -> dict[str, object]:
        return {}  # diffusers' SmoothedEnergyGuidanceConfig holds only the blocks


__all__ = ["SmoothedEnergyGuidance"]
