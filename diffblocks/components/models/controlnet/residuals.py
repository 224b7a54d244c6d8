"""How a UNet ControlNet turns its copy of the UNet's encoder into residuals (Zhang et al. 2023, section 3.2).

Both UNet ControlNets (:class:`~diffblocks.components.models.controlnet.ControlNetModel` and
:class:`~diffblocks.components.models.controlnet.ControlNetUnionModel`) run a copy of the UNet's
down path and mid block, and pass the features of each skip connection and of the mid block
through a zero-initialised 1x1 convolution, a "zero convolution", so that a new ControlNet leaves
its UNet unchanged. The residuals come in the order ``UNet2DConditionModel`` takes them
(``down_block_additional_residuals``, then ``mid_block_additional_residual``).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from diffblocks.components.models.unet.blocks import MidBlock
from diffblocks.components.models.unet.params import UNet2DConditionParams


class ControlTrunk(Protocol):
    """The modules of a UNet ControlNet that :func:`encoder_residuals` runs, under diffusers' names."""

    down_blocks: nn.ModuleList
    mid_block: MidBlock
    controlnet_down_blocks: nn.ModuleList
    controlnet_mid_block: nn.Conv2d


def zero_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A convolution that starts at zero, so a new ControlNet leaves its UNet unchanged (the paper's "zero convolution")."""
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def skip_convs(unet: UNet2DConditionParams) -> nn.ModuleList:
    """One zero convolution per skip connection, in the UNet's order: ``conv_in``, then each stage's layers and downsampler."""
    chans = unet.block_out_channels
    widths = [chans[0]]
    for i in range(unet.num_blocks):
        widths += [chans[i]] * (unet.layers[i] + (i < unet.num_blocks - 1))
    return nn.ModuleList(zero_conv(nn.Conv2d(c, c, 1)) for c in widths)


def encoder_residuals(
    net: ControlTrunk, h: Tensor, emb: Tensor, context: Tensor, *, context_mask: Tensor | None = None
) -> list[Tensor]:
    """The residuals of one call, unscaled: the down path and mid block run on ``h``, each output through its zero conv.

    Args:
        net: the ControlNet.
        h: the first stage's input: ``conv_in(sample)`` plus the control image's features.
        emb: the time embedding, through SiLU as every ResNet reads it.
        context: text embeddings.
        context_mask: an additive attention bias over the text tokens, or None.
    """
    skips = [h]
    for down in net.down_blocks:
        h, res = down(h, emb, context, context_mask=context_mask)
        skips += res
    h = net.mid_block(h, emb, context, context_mask=context_mask)
    out = [conv(s) for conv, s in zip(net.controlnet_down_blocks, skips, strict=True)]
    out.append(net.controlnet_mid_block(h))
    return out


def guess_mode_scales(count: int, device: torch.device) -> Tensor:
    """diffusers' guess mode: residual scales log-spaced from 0.1 at the first skip connection to 1 at the mid block."""
    return torch.logspace(-1, 0, count, device=device)


__all__ = ["ControlTrunk", "encoder_residuals", "guess_mode_scales", "skip_convs", "zero_conv"]
