"""Skip-layer guidance (SLG): guide away from the model with some blocks skipped."""

from __future__ import annotations

from typing import ClassVar, final

from diffblocks.components.guiders.families import SKIP_LAYERS
from diffblocks.components.guiders.perturbations import SkipBlocks
from diffblocks.components.guiders.perturbed import AbstractPerturbedConditionGuider, LayerPaths


@final
class SkipLayerGuidance(AbstractPerturbedConditionGuider):
    """Skip-layer guidance, Stability AI (SD3.5, 2024); see also STG, Hyung et al. (2024), arXiv:2411.18664.

    A third prediction is made with the chosen blocks skipped (each returns its input), and
    ``uncond + s * (cond - uncond) + s_slg * (cond - cond_skipped)`` is returned.

    Args:
        skip_layer_guidance_scale: ``s_slg``.
        skip_layer_guidance_start: fraction of the steps after which SLG acts.
        skip_layer_guidance_stop: fraction of the steps at which SLG stops.
        skip_layer_guidance_layers: block paths, or block lists; defaults to the ``family``'s
            (Flux: ``transformer_blocks.7-9``; SD, SDXL: the mid-block transformer blocks).
        family: ``"sd15"``, ``"sdxl"``, ``"flux"`` or ``"tiny"``.
        (other fields): as :class:`~diffblocks.components.guiders.base.AbstractClassifierFreeGuider`.
    """

    layers_field: ClassVar[str] = "skip_layer_guidance_layers"
    perturbed_fields: ClassVar[tuple[str, str, str]] = (
        "skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop",
    )
    layer_config_key: ClassVar[str] = "skip_layer_config"
    default_layers: ClassVar[dict[str, tuple[str, ...]]] = dict(SKIP_LAYERS)

    skip_layer_guidance_scale: float = 2.8
    skip_layer_guidance_start: float = 0.01
    skip_layer_guidance_stop: float = 0.2
    skip_layer_guidance_layers: LayerPaths = None

    def make_perturbation(self, layers: tuple[str, ...]) -> SkipBlocks:
        return SkipBlocks(layers)

    def layer_config_settings(self) -> dict[str, object]:
        # Attention and feed-forward both skipped: diffusers skips the whole block.
        return {"skip_attention": True, "skip_attention_scores": False, "skip_ff": True, "dropout": 1.0}


__all__ = ["SkipLayerGuidance"]
