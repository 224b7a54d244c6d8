"""Hyper-parameters of the UNet ControlNet, named like diffusers' ``ControlNetModel`` config."""

from __future__ import annotations

from typing import Literal, final

from pydantic import model_validator
from typing_extensions import Self

from diffblocks.components.models.base import AbstractParams
from diffblocks.components.models.unet.params import DownBlockType, UNet2DConditionParams, UpBlockType

# Keys of diffusers' config that this ControlNet supports at one value only, as for the UNet.
CONTROLNET_FIXED_CONFIG: dict[str, object] = {
    "act_fn": "silu",
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "num_attention_heads": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "global_pool_conditions": False,
}


class AbstractControlNetParams(AbstractParams):
    """What every UNet ControlNet's architecture shares (Zhang et al. 2023): a copy of a UNet's encoder and mid block.

    The fields that describe the encoder mean what they mean in
    :class:`~diffblocks.components.models.unet.UNet2DConditionParams` (``attention_head_dim`` is
    the number of heads, in diffusers' naming); :meth:`encoder` gives them as UNet params so the
    ControlNet builds its stages with the UNet's own blocks. The fields of its own are the control
    image's channels and the small convolutional encoder that brings the image to latent size.
    """

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[DownBlockType, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    addition_embed_type: Literal["text_time"] | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    controlnet_conditioning_channel_order: Literal["rgb", "bgr"] = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)

    def encoder(self) -> UNet2DConditionParams:
        """The UNet whose encoder this ControlNet copies (its up path mirrors the down path, unused here)."""
        flip: dict[DownBlockType, UpBlockType] = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
        return UNet2DConditionParams(
            in_channels=self.in_channels,
            flip_sin_to_cos=self.flip_sin_to_cos,
            freq_shift=self.freq_shift,
            down_block_types=self.down_block_types,
            up_block_types=tuple(flip[kind] for kind in reversed(self.down_block_types)),
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            downsample_padding=self.downsample_padding,
            mid_block_scale_factor=self.mid_block_scale_factor,
            norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps,
            cross_attention_dim=self.cross_attention_dim,
            transformer_layers_per_block=self.transformer_layers_per_block,
            attention_head_dim=self.attention_head_dim,
            use_linear_projection=self.use_linear_projection,
            upcast_attention=self.upcast_attention,
            addition_embed_type=self.addition_embed_type,
            addition_time_embed_dim=self.addition_time_embed_dim,
            projection_class_embeddings_input_dim=self.projection_class_embeddings_input_dim,
        )

    @model_validator(mode="after")
    def _check(self) -> Self:
        self.encoder()  # the UNet's own checks: per-block lengths, groups, heads, text-time settings
        if not self.conditioning_embedding_out_channels:
            raise ValueError("conditioning_embedding_out_channels needs at least one entry")
        return self


@final
class ControlNetParams(AbstractControlNetParams):
    """ControlNetModel architecture: see :class:`AbstractControlNetParams`."""


@final
class ControlNetUnionParams(AbstractControlNetParams):
    """ControlNetUnionModel architecture (Xinsir's ControlNet++ for SDXL): a ControlNet that reads several kinds of control.

    Besides a ControlNet's fields: ``num_control_type`` kinds of control image (each with a learnt
    task embedding), and a small transformer (``num_trans_layer`` layers of ``num_trans_head``
    heads, ``num_trans_channel`` wide) that fuses the control images' features; its output is
    projected to ``num_proj_channel``. Both widths must equal the first stage width, as they are
    added to its features.
    """

    conditioning_embedding_out_channels: tuple[int, ...] = (48, 96, 192, 384)
    num_control_type: int = 6
    num_trans_channel: int = 320
    num_trans_head: int = 8
    num_trans_layer: int = 1
    num_proj_channel: int = 320

    @model_validator(mode="after")
    def _check_union(self) -> Self:
        first = self.block_out_channels[0]
        for name in ("num_trans_channel", "num_proj_channel"):
            if getattr(self, name) != first:
                raise ValueError(f"{name} {getattr(self, name)} must equal block_out_channels[0] {first}: it is added to that stage's features")
        if self.num_trans_channel % self.num_trans_head:
            raise ValueError(f"num_trans_channel {self.num_trans_channel} must be divisible by num_trans_head {self.num_trans_head}")
        if self.num_control_type < 1:
            raise ValueError(f"num_control_type must be >= 1, got {self.num_control_type}")
        if self.addition_time_embed_dim is None:
            raise ValueError("a ControlNet-Union embeds its control types like SDXL's size ids: set addition_time_embed_dim")
        return self


__all__ = ["CONTROLNET_FIXED_CONFIG", "AbstractControlNetParams", "ControlNetParams", "ControlNetUnionParams"]
