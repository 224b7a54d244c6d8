"""Perturbed-attention guidance (PAG): guide away from the model with identity self-attention maps."""

from __future__ import annotations

from typing import ClassVar, final

from diffblocks.components.guiders.families import ATTENTION_LAYERS
from diffblocks.components.guiders.perturbations import IdentityAttention
from diffblocks.components.guiders.perturbed import AbstractPerturbedConditionGuider, LayerPaths


@final
class PerturbedAttentionGuidance(AbstractPerturbedConditionGuider):
    """Perturbed-attention guidance, Ahn et al. (2024), arXiv:2403.17377.

    A third prediction is made with chosen self-attention maps replaced by the identity (each token
    attends only to itself, so attention returns the values), and
    ``uncond + s * (cond - uncond) + s_pag * (cond - cond_perturbed)`` is returned.

    Args:
        perturbed_guidance_scale: ``s_pag``.
        perturbed_guidance_start: fraction of the steps after which PAG acts.
        perturbed_guidance_stop: fraction of the steps at which PAG stops.
        perturbed_guidance_layers: attention layers, or blocks holding self-attention, as module
            paths; defaults to the ``family``'s (``mid_block`` for SD and SDXL).
        family: ``"sd15"``, ``"sdxl"``, ``"flux"`` or ``"tiny"``.
        (other fields): as :class:`~diffblocks.components.guiders.base.AbstractClassifierFreeGuider`.

    Example:
        >>> pag = PerturbedAttentionGuidance.for_family("sdxl", perturbed_guidance_scale=3.0)
        >>> [p.condition for p in pag.passes(5, 50)], pag.perturbation.targets
        (['cond', 'uncond', 'cond'], ('mid_block',))
    """

    layers_field: ClassVar[str] = "perturbed_guidance_layers"
    perturbed_fields: ClassVar[tuple[str, str, str]] = (
        "perturbed_guidance_scale", "perturbed_guidance_start", "perturbed_guidance_stop",
    )
    layer_config_key: ClassVar[str] = "perturbed_guidance_config"
    default_layers: ClassVar[dict[str, tuple[str, ...]]] = dict(ATTENTION_LAYERS)

    perturbed_guidance_scale: float = 2.8
    perturbed_guidance_start: float = 0.01
    perturbed_guidance_stop: float = 0.2
    perturbed_guidance_layers: LayerPaths = None

    def make_perturbation(self, layers: tuple[str, ...]) -> IdentityAttention:
        return IdentityAttention(layers)

    def layer_config_settings(self) -> dict[str, object]:
        # Diffusers' PAG swaps the attention map of each self-attention in the blocks, nothing else.
        return {"skip_attention": False, "skip_attention_scores": True, "skip_ff": False, "dropout": 1.0}


__all__ = ["PerturbedAttentionGuidance"]
