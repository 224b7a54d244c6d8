"""Encoder and decoder stages of the KL autoencoder (no timestep embedding, GroupNorm eps 1e-6).

Attribute names match diffusers' ``DownEncoderBlock2D``, ``UpDecoderBlock2D`` and ``UNetMidBlock2D``.
"""

from __future__ import annotations

from typing import final

from jaxtyping import Float
from torch import Tensor, nn

from diffblocks.components.models.layers.attention import SpatialSelfAttention
from diffblocks.components.models.layers.resnet import Downsample2D, ResnetBlock2D, Upsample2D

EPS = 1e-6


def _resnets(c_in: int, c_out: int, n: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList(
        ResnetBlock2D(c_in if i == 0 else c_out, c_out, temb_channels=None, groups=groups, eps=EPS) for i in range(n)
    )


@final
class EncoderBlock(nn.Module):
    """Resnets, then (except in the last stage) a stride-2 convolution padded right/bottom."""

    def __init__(self, c_in: int, c_out: int, *, num_layers: int, groups: int, add_downsample: bool) -> None:
        super().__init__()
        self.resnets = _resnets(c_in, c_out, num_layers, groups)
        self.downsamplers = nn.ModuleList([Downsample2D(c_out, padding=0)]) if add_downsample else None

    def forward(self, x: Float[Tensor, "batch c_in h w"]) -> Float[Tensor, "batch c_out h2 w2"]:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


@final
class DecoderBlock(nn.Module):
    """Resnets, then (except in the last stage) nearest-neighbour upsampling and a convolution."""

    def __init__(self, c_in: int, c_out: int, *, num_layers: int, groups: int, add_upsample: bool) -> None:
        super().__init__()
        self.resnets = _resnets(c_in, c_out, num_layers, groups)
        self.upsamplers = nn.ModuleList([Upsample2D(c_out)]) if add_upsample else None

    def forward(self, x: Float[Tensor, "batch c_in h w"]) -> Float[Tensor, "batch c_out h2 w2"]:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


@final
class MidBlock(nn.Module):
    """Resnet, single-head self-attention over all pixels (optional), resnet."""

    def __init__(self, channels: int, *, groups: int, add_attention: bool) -> None:
        super().__init__()
        attentions = (
            [SpatialSelfAttention(channels, head_dim=channels, groups=groups, eps=EPS)] if add_attention else []
        )
        self.attentions = nn.ModuleList(attentions)
        self.resnets = _resnets(channels, channels, 2, groups)

    def forward(self, x: Float[Tensor, "batch c h w"]) -> Float[Tensor, "batch c h w"]:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


__all__ = ["DecoderBlock", "EncoderBlock", "MidBlock"]
