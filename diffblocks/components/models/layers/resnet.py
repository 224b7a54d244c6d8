"""Convolutional building blocks shared by the UNet and the VAE: residual block, down- and upsampling.

Attribute names follow diffusers' ``ResnetBlock2D``, ``Downsample2D`` and ``Upsample2D`` so the
state-dict keys match theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import final

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from diffblocks.components.models.layers.norm import GroupNorm


@final
class ResnetBlock2D(nn.Module):
    """Pre-norm residual block with an optional additive timestep embedding (Ho et al. 2020, DDPM).

    Args:
        in_channels: input channels.
        out_channels: output channels; a 1x1 ``conv_shortcut`` matches the residual when they differ.
        temb_channels: width of the timestep embedding, or None for blocks without one (the VAE).
        groups: GroupNorm groups.
        eps: GroupNorm epsilon.
        dropout: dropout before the second convolution.
        output_scale_factor: the sum is divided by this.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int | None,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(
        self, x: Float[Tensor, "batch c_in height width"], temb: Float[Tensor, "batch temb"] | None = None
    ) -> Float[Tensor, "batch c_out height width"]:
        """``temb`` is the timestep embedding already passed through SiLU (the UNet applies it once)."""
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = skip + h
        # every SD, SDXL and VAE ResNet has factor 1: dividing by it would be one more kernel launch
        # and a pass over the activations for an exact no-op
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


@final
class Downsample2D(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution.

    Args:
        channels: input and output channels.
        padding: 1 pads symmetrically (UNet); 0 pads only right and bottom by one (the VAE,
            following the original latent-diffusion encoder).
    """

    def __init__(self, channels: int, *, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: Float[Tensor, "batch c height width"]) -> Float[Tensor, "batch c h2 w2"]:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


@final
class Upsample2D(nn.Module):
    """Double the resolution (nearest neighbour), then a 3x3 convolution.

    Args:
        channels: input and output channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(
        self, x: Float[Tensor, "batch c height width"], size: Sequence[int] | None = None
    ) -> Float[Tensor, "batch c h2 w2"]:
        """Upsample to ``size`` (the skip connection's size, for odd inputs) or by 2."""
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)


__all__ = ["Downsample2D", "ResnetBlock2D", "Upsample2D"]
