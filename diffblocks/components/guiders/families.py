"""Default layers per model family for the guiders that perturb the denoiser.

Paths are diffusers module names, which our models keep. UNet families perturb the mid block (the
PAG and SEG papers' choice for SD and SDXL; the built-in tiny model's UNet has SD 1.x's layout);
Flux perturbs double-stream blocks, whose attention sees image tokens apart from text (needed by
SEG's image-grid blur). The names are those of the preset families, so
``PerturbedAttentionGuidance.for_family(pipe.preset.family)`` suits any built-in pipeline.

A family may also imply settings other than layers (:data:`CONDITION_SETTINGS`, :data:`AUTO_GUIDANCE_SETTINGS`):
Flux.1-dev is guidance-distilled and runs without a negative prompt, so on Flux the perturbing
guiders leave classifier-free guidance off and guide with the perturbation alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal, get_args

Family = Literal["sd15", "sdxl", "flux", "tiny"]
FAMILIES: tuple[str, ...] = get_args(Family)

_UNET_MID_BLOCKS = ("mid_block.attentions.0.transformer_blocks",)

# Self-attention layers for perturbed-attention and smoothed-energy guidance.
ATTENTION_LAYERS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"sd15": ("mid_block",), "sdxl": ("mid_block",), "flux": ("transformer_blocks.1",), "tiny": ("mid_block",)}
)

# Whole blocks to skip for skip-layer guidance and auto-guidance; Flux follows the SD3.5
# recommendation of three consecutive middle double-stream blocks.
SKIP_LAYERS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "sd15": _UNET_MID_BLOCKS,
        "sdxl": _UNET_MID_BLOCKS,
        "flux": ("transformer_blocks.7", "transformer_blocks.8", "transformer_blocks.9"),
        "tiny": _UNET_MID_BLOCKS,
    }
)

# How the defaults above that name a container, not one block, are written for diffusers, which
# names layers by a block list and indices in it. A UNet's mid block holds one transformer
# (``attentions.0``, so ``mid_block`` is its self-attentions); the transformer's depth depends on
# the model, and no model is at hand when a guider is saved, so it is the family's released one:
# 1 block in SD 1.x and the tiny model, 10 in SDXL base. Flux's defaults are single blocks already.
def _unet_stacks(depth: int) -> Mapping[str, tuple[str, tuple[int, ...]]]:
    return MappingProxyType(
        {"mid_block": ("mid_block.attentions", (0,)), _UNET_MID_BLOCKS[0]: (_UNET_MID_BLOCKS[0], tuple(range(depth)))}
    )


LAYER_STACKS: Mapping[str, Mapping[str, tuple[str, tuple[int, ...]]]] = MappingProxyType(
    {"sd15": _unet_stacks(1), "sdxl": _unet_stacks(10), "flux": MappingProxyType({}), "tiny": _unet_stacks(1)}
)

# Settings a family implies unless given. PAG, SLG and SEG on Flux: CFG off (scale 1), the
# perturbed term only, so no negative prompt is needed and each step makes two forwards, not three.
CONDITION_SETTINGS: Mapping[str, Mapping[str, object]] = MappingProxyType({"flux": {"guidance_scale": 1.0}})

# Auto-guidance's scale is its only term, so Flux keeps it on but makes the weak prediction from the
# prompt (the paper's form, no negative prompt needed), weighted as PAG, SLG and SEG weigh theirs.
AUTO_GUIDANCE_SETTINGS: Mapping[str, Mapping[str, object]] = MappingProxyType(
    {"flux": {"guidance_scale": 2.8, "weak_condition": "cond"}}
)

__all__ = [
    "ATTENTION_LAYERS",
    "AUTO_GUIDANCE_SETTINGS",
    "CONDITION_SETTINGS",
    "FAMILIES",
    "Family",
    "LAYER_STACKS",
    "SKIP_LAYERS",
]
