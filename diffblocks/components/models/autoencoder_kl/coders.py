"""The convolutional encoder and decoder of the KL autoencoder (Rombach et al. 2022, appendix G)."""

from __future__ import annotations

from typing import final

from jaxtyping import Float
from torch import Tensor, nn

from diffblocks.components.models.autoencoder_kl.blocks import EPS, DecoderBlock, EncoderBlock, MidBlock
from diffblocks.components.models.autoencoder_kl.params import AutoencoderKLParams
from diffblocks.components.models.layers.norm import GroupNorm


@final
class Encoder(nn.Module):
    """Image to Gaussian moments: ``2 * latent_channels`` maps (mean, log-variance) at 1/downscale size."""

    def __init__(self, p: AutoencoderKLParams) -> None:
        super().__init__()
        chans, groups, n = p.block_out_channels, p.norm_num_groups, len(p.block_out_channels)
        self.conv_in = nn.Conv2d(p.in_channels, chans[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(
                chans[max(i - 1, 0)], chans[i], num_layers=p.layers_per_block, groups=groups, add_downsample=i < n - 1
            )
            for i in range(n)
        )
        self.mid_block = MidBlock(chans[-1], groups=groups, add_attention=p.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, chans[-1], eps=EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(chans[-1], 2 * p.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: Float[Tensor, "batch c_img h w"]) -> Float[Tensor, "batch moments h2 w2"]:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


@final
class Decoder(nn.Module):
    """Latents to image, mirroring the encoder with one extra resnet per stage."""

    def __init__(self, p: AutoencoderKLParams) -> None:
        super().__init__()
        rev, groups, n = p.block_out_channels[::-1], p.norm_num_groups, len(p.block_out_channels)
        self.conv_in = nn.Conv2d(p.latent_channels, rev[0], kernel_size=3, padding=1)
        self.mid_block = MidBlock(rev[0], groups=groups, add_attention=p.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(
                rev[max(i - 1, 0)], rev[i], num_layers=p.layers_per_block + 1, groups=groups, add_upsample=i < n - 1
            )
            for i in range(n)
        )
        self.conv_norm_out = GroupNorm(groups, rev[-1], eps=EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(rev[-1], p.out_channels, kernel_size=3, padding=1)

    def forward(self, z: Float[Tensor, "batch latent h w"]) -> Float[Tensor, "batch c_img h2 w2"]:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


__all__ = ["Decoder", "Encoder"]
