"""Hyper-parameters of the conditional UNet, named like diffusers' ``UNet2DConditionModel`` config."""

from __future__ import annotations

from typing import Literal, TypeVar, final

from pydantic import model_validator
from typing_extensions import Self

from diffblocks.components.models.base import AbstractParams

DownBlockType = Literal["CrossAttnDownBlock2D", "DownBlock2D"]
UpBlockType = Literal["CrossAttnUpBlock2D", "UpBlock2D"]
T = TypeVar("T")

# Keys of diffusers' config that this UNet supports at one value only (anything else changes the
# architecture in ways not implemented here: class embeddings, GLIGEN, LCM time conditioning, ...).
UNET_FIXED_CONFIG: dict[str, object] = {
    "act_fn": "silu",
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "dual_cross_attention": False,
    "num_attention_heads": None,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "cross_attention_norm": None,
}


def _per_block(value: T | tuple[T, ...], n: int) -> tuple[T, ...]:
    return value if isinstance(value, tuple) else (value,) * n


@final
class UNet2DConditionParams(AbstractParams):
    """UNet2DConditionModel architecture: SD1.x/2.x (incl. inpainting) and SDXL configs.

    Note diffusers' naming quirk, kept for compatibility: ``attention_head_dim`` is the number of
    attention *heads* per block (SD1.5: 8 heads everywhere; SDXL: 5, 10, 20); the channels per
    head are ``block_out_channels[i] // attention_head_dim[i]``.
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[DownBlockType, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[UpBlockType, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    dropout: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    addition_embed_type: Literal["text_time"] | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block (diffusers' ``attention_head_dim``)."""
        return _per_block(self.attention_head_dim, self.num_blocks)

    @property
    def layers(self) -> tuple[int, ...]:
        """Resnet layers per down block (up blocks have one more)."""
        return _per_block(self.layers_per_block, self.num_blocks)

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        """Transformer blocks per attention layer, per down block."""
        return _per_block(self.transformer_layers_per_block, self.num_blocks)

    @property
    def cross_dims(self) -> tuple[int, ...]:
        """Text-embedding width each down block cross-attends to."""
        return _per_block(self.cross_attention_dim, self.num_blocks)

    @property
    def attention_stages(self) -> tuple[int, ...]:
        """Stages (indices of ``block_out_channels``) that attend: cross-attention down or up blocks, the mid block."""
        n = self.num_blocks
        down = {i for i, kind in enumerate(self.down_block_types) if kind == "CrossAttnDownBlock2D"}
        # up block j runs stage n-1-j; the mid block attends at the last stage
        up = {n - 1 - j for j, kind in enumerate(self.up_block_types) if kind == "CrossAttnUpBlock2D"}
        return tuple(sorted(down | up | {n - 1}))

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @model_validator(mode="after")
    def _check(self) -> Self:
        n = self.num_blocks
        for name in ("down_block_types", "up_block_types", "layers_per_block", "attention_head_dim",
                     "cross_attention_dim", "transformer_layers_per_block"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:  # pyright: ignore[reportUnknownArgumentType]
                raise ValueError(f"{name} has {len(value)} entries but block_out_channels has {n}")  # pyright: ignore[reportUnknownArgumentType]
        for i, channels in enumerate(self.block_out_channels):
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"norm_num_groups {self.norm_num_groups} does not divide block_out_channels[{i}] {channels}"
                )
        # heads split channels only where a stage attends: a plain DownBlock2D/UpBlock2D stage may have
        # channels that its heads do not divide (diffusers' SD test UNet: 8 heads on a 4-channel plain stage)
        for i in self.attention_stages:
            if self.block_out_channels[i] % self.heads[i]:
                raise ValueError(
                    f"attention_head_dim {self.heads[i]} (heads, in diffusers' naming) does not divide "
                    f"block_out_channels[{i}] {self.block_out_channels[i]} of an attention stage"
                )
        for name in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, name) % 2 == 0:
                raise ValueError(f"{name} {getattr(self, name)} must be odd to keep the spatial size")
        if self.addition_embed_type == "text_time" and (
            self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None
        ):
            raise ValueError(
                "addition_embed_type 'text_time' needs addition_time_embed_dim and "
                f"projection_class_embeddings_input_dim (got {self.addition_time_embed_dim} and "
                f"{self.projection_class_embeddings_input_dim})"
            )
        return self


__all__ = ["UNET_FIXED_CONFIG", "UNet2DConditionParams"]
