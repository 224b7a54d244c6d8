"""UNet stages: down blocks, the cross-attention mid block, and up blocks with skip connections.

One class per stage kind; the diffusers ``CrossAttn*Block2D`` and plain ``*Block2D`` variants differ
only in whether ``attentions`` is empty, which gives the same state-dict keys as diffusers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import final

import torch
from jaxtyping import Float
from torch import Tensor, nn

from diffblocks.components.models.layers.attention import CrossAttentionExtras
from diffblocks.components.models.layers.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffblocks.components.models.unet.transformer import SpatialTransformer


@dataclass(frozen=True)
class StageSpec:
    """What a down, mid or up stage needs to know about the whole UNet."""

    temb_channels: int
    groups: int
    eps: float
    dropout: float
    use_linear_projection: bool


def _transformers(channels: int, n: int, *, heads: int, context_dim: int, depth: int, spec: StageSpec) -> nn.ModuleList:
    return nn.ModuleList(
        SpatialTransformer(
            channels,
            heads=heads,
            context_dim=context_dim,
            num_layers=depth,
            groups=spec.groups,
            use_linear_projection=spec.use_linear_projection,
            dropout=spec.dropout,
        )
        for _ in range(n)
    )


def _resnet(c_in: int, c_out: int, spec: StageSpec, scale: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(
        c_in,
        c_out,
        temb_channels=spec.temb_channels,
        groups=spec.groups,
        eps=spec.eps,
        dropout=spec.dropout,
        output_scale_factor=scale,
    )


@final
class DownBlock(nn.Module):
    """Resnets (each optionally followed by a spatial transformer), then an optional stride-2 conv.

    Args:
        c_in: input channels; c_out: channels of every layer's output.
        num_layers: resnet layers.
        attention: ``CrossAttnDownBlock2D`` (True) or ``DownBlock2D`` (False).
        heads, context_dim, depth: transformer heads, text width and blocks per transformer.
        add_downsample: halve the resolution at the end (all but the last stage).
        downsample_padding: padding of the downsampling convolution.
        spec: settings shared by all stages.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        *,
        num_layers: int,
        attention: bool,
        heads: int,
        context_dim: int,
        depth: int,
        add_downsample: bool,
        downsample_padding: int,
        spec: StageSpec,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(_resnet(c_in if i == 0 else c_out, c_out, spec) for i in range(num_layers))
        n_attn = num_layers if attention else 0
        self.attentions = _transformers(c_out, n_attn, heads=heads, context_dim=context_dim, depth=depth, spec=spec)
        self.downsamplers = nn.ModuleList([Downsample2D(c_out, padding=downsample_padding)]) if add_downsample else None

    def forward(
        self,
        x: Tensor,
        temb: Tensor,
        context: Tensor,
        *,
        context_mask: Tensor | None = None,
        extras: CrossAttentionExtras | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Return the output and every intermediate the up path concatenates back."""
        skips: list[Tensor] = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context, context_mask=context_mask, extras=extras)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


@final
class MidBlock(nn.Module):
    """Resnet, spatial transformer, resnet at the lowest resolution (``UNetMidBlock2DCrossAttn``)."""

    def __init__(
        self, channels: int, *, heads: int, context_dim: int, depth: int, scale: float, spec: StageSpec
    ) -> None:
        super().__init__()
        self.attentions = _transformers(channels, 1, heads=heads, context_dim=context_dim, depth=depth, spec=spec)
        self.resnets = nn.ModuleList(_resnet(channels, channels, spec, scale) for _ in range(2))

    def forward(
        self,
        x: Tensor,
        temb: Tensor,
        context: Tensor,
        *,
        context_mask: Tensor | None = None,
        extras: CrossAttentionExtras | None = None,
    ) -> Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, context_mask=context_mask, extras=extras)
        return self.resnets[1](x, temb)


@final
class UpBlock(nn.Module):
    """Concatenate a skip connection before each resnet (and transformer), then optionally upsample.

    Args:
        c_in: channels of the matching down stage's input (its last skip).
        c_out: channels of every layer's output.
        c_prev: channels arriving from the previous (lower) up stage.
        num_layers: resnet layers (the down stage's layers + 1).
        attention: ``CrossAttnUpBlock2D`` (True) or ``UpBlock2D`` (False).
        heads, context_dim, depth: as for :class:`DownBlock`.
        add_upsample: double the resolution at the end (all but the last stage).
        spec: settings shared by all stages.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        c_prev: int,
        *,
        num_layers: int,
        attention: bool,
        heads: int,
        context_dim: int,
        depth: int,
        add_upsample: bool,
        spec: StageSpec,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet((c_prev if i == 0 else c_out) + (c_in if i == num_layers - 1 else c_out), c_out, spec)
            for i in range(num_layers)
        )
        n_attn = num_layers if attention else 0
        self.attentions = _transformers(c_out, n_attn, heads=heads, context_dim=context_dim, depth=depth, spec=spec)
        self.upsamplers = nn.ModuleList([Upsample2D(c_out)]) if add_upsample else None

    def forward(
        self,
        x: Float[Tensor, "batch c height width"],
        skips: Sequence[Tensor],
        temb: Tensor,
        context: Tensor,
        *,
        context_mask: Tensor | None = None,
        extras: CrossAttentionExtras | None = None,
        upsample_size: Sequence[int] | None = None,
    ) -> Tensor:
        """``skips`` are this stage's skip connections in down-path order; they are used last first."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), temb)  # features first, as trained
            if self.attentions:
                x = self.attentions[i](x, context, context_mask=context_mask, extras=extras)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


__all__ = ["DownBlock", "MidBlock", "StageSpec", "UpBlock"]
