"""Hyper-parameters of the Flux.1 transformer, under diffusers' ``config.json`` key names."""

from __future__ import annotations

from pydantic import model_validator
from typing_extensions import Self

from diffblocks.components.models.base import AbstractParams


class FluxParams(AbstractParams):
    """Shape of a Flux.1 rectified-flow transformer (Black Forest Labs, 2024), validated once.

    Field names are the keys of diffusers' ``FluxTransformer2DModel`` ``config.json``, so a config
    file maps onto this class one to one. Defaults are diffusers' (Flux.1 sizes, schnell's
    missing guidance embedder), so a partial config reads the same in both libraries.

    Args:
        patch_size: side of the square patch each output token predicts; Flux.1 packs 2x2 latent
            patches itself (see ``latents.py``) and keeps this at 1.
        in_channels: channels of one packed token (latent channels x 4).
        out_channels: channels of one predicted token; ``None`` means ``in_channels``.
        num_layers: double-stream (MM-DiT) blocks.
        num_single_layers: single-stream (parallel attention + MLP) blocks.
        attention_head_dim: channels per attention head; the RoPE axes split it.
        num_attention_heads: attention heads; ``inner_dim = heads * head_dim``.
        joint_attention_dim: channels of the T5 text embeddings.
        pooled_projection_dim: channels of the pooled CLIP embedding.
        guidance_embeds: whether the model embeds a distilled guidance scale (dev: yes, schnell: no).
        axes_dims_rope: rotary channels per position-id axis; must sum to ``attention_head_dim``.
    """

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    @model_validator(mode="after")
    def _check(self) -> Self:
        positive = {
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "num_attention_heads": self.num_attention_heads,
            "attention_head_dim": self.attention_head_dim,
            "joint_attention_dim": self.joint_attention_dim,
            "pooled_projection_dim": self.pooled_projection_dim,
        }
        if self.out_channels is not None:
            positive["out_channels"] = self.out_channels
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in (("num_layers", self.num_layers), ("num_single_layers", self.num_single_layers)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not self.axes_dims_rope:
            raise ValueError("axes_dims_rope must name at least one axis, got ()")
        odd = [d for d in self.axes_dims_rope if d < 2 or d % 2]
        if odd:
            raise ValueError(
                f"every entry of axes_dims_rope must be a positive even number (rotations act on "
                f"channel pairs), got {self.axes_dims_rope}"
            )
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"sum(axes_dims_rope) = {sum(self.axes_dims_rope)} {self.axes_dims_rope} must equal "
                f"attention_head_dim {self.attention_head_dim}"
            )
        return self

    @property
    def inner_dim(self) -> int:
        """Width of the residual stream: ``num_attention_heads * attention_head_dim``."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def resolved_out_channels(self) -> int:
        """``out_channels``, or ``in_channels`` when the config leaves it unset."""
        return self.in_channels if self.out_channels is None else self.out_channels


FLUX_DEV = FluxParams(guidance_embeds=True)
"""Flux.1-dev: guidance-distilled, 19 double + 38 single blocks."""

FLUX_SCHNELL = FluxParams(guidance_embeds=False)
"""Flux.1-schnell: timestep-distilled, no guidance embedder."""
