"""The text-conditioned UNet of Stable Diffusion 1.x/2.x and SDXL (Rombach et al. 2022; Podell et al. 2023)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, final

import torch
from jaxtyping import Float
from torch import Tensor, nn

from diffblocks.components.models.base import AbstractModel
from diffblocks.components.models.layers.attention import CrossAttentionExtras
from diffblocks.components.models.layers.norm import GroupNorm
from diffblocks.components.models.layers.resnet import ResnetBlock2D
from diffblocks.components.models.unet.blocks import DownBlock, MidBlock, StageSpec, UpBlock
from diffblocks.components.models.unet.embeddings import batch_timesteps, text_time_embedding, time_embeddings
from diffblocks.components.models.unet.params import UNET_FIXED_CONFIG, UNet2DConditionParams
from diffblocks.components.models.unet.transformer import SpatialTransformer


def encoder_stages(p: UNet2DConditionParams, spec: StageSpec) -> nn.ModuleList:
    """The down path of a UNet with ``p``'s architecture (a ControlNet builds the same one)."""
    chans = p.block_out_channels
    return nn.ModuleList(
        DownBlock(
            chans[max(i - 1, 0)],
            chans[i],
            num_layers=p.layers[i],
            attention=kind == "CrossAttnDownBlock2D",
            heads=p.heads[i],
            context_dim=p.cross_dims[i],
            depth=p.transformer_layers[i],
            add_downsample=i < p.num_blocks - 1,
            downsample_padding=p.downsample_padding,
            spec=spec,
        )
        for i, kind in enumerate(p.down_block_types)
    )


def middle_stage(p: UNet2DConditionParams, spec: StageSpec) -> MidBlock:
    """The mid block of a UNet with ``p``'s architecture."""
    return MidBlock(
        p.block_out_channels[-1],
        heads=p.heads[-1],
        context_dim=p.cross_dims[-1],
        depth=p.transformer_layers[-1],
        scale=p.mid_block_scale_factor,
        spec=spec,
    )

@final
class UNet2DConditionModel(AbstractModel[UNet2DConditionParams]):
    """Predict noise (or v) from a noisy latent, a timestep and text embeddings.

    Module and parameter names equal diffusers' ``UNet2DConditionModel``, so diffusers folders load
    unchanged and module paths such as ``mid_block.attentions.0.transformer_blocks.0.attn1`` address
    the same layers.

    Args:
        params: the architecture; build from a diffusers config with :meth:`from_config`.

    Example:
        >>> params = UNet2DConditionParams(block_out_channels=(32, 64), layers_per_block=1,
        ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        ...     attention_head_dim=2)
        >>> unet = UNet2DConditionModel(params)
        >>> unet(torch.randn(1, 4, 16, 16), 10, torch.randn(1, 7, 32)).shape
        torch.Size([1, 4, 16, 16])
    """

    Params = UNet2DConditionParams
    diffusers_class_name = "UNet2DConditionModel"
    fixed_config: ClassVar[Mapping[str, object]] = UNET_FIXED_CONFIG
    repeated_blocks: ClassVar[tuple[type[nn.Module], ...]] = (ResnetBlock2D, SpatialTransformer)

    def __init__(self, params: UNet2DConditionParams) -> None:
        super().__init__(params)
        p = params
        chans = p.block_out_channels
        spec = StageSpec(p.time_embed_dim, p.norm_num_groups, p.norm_eps, p.dropout, p.use_linear_projection)

        self.conv_in = nn.Conv2d(p.in_channels, chans[0], p.conv_in_kernel, padding=p.conv_in_kernel // 2)
        self.time_proj, self.time_embedding, self.add_time_proj, self.add_embedding = time_embeddings(p)

        self.down_blocks = encoder_stages(p, spec)
        self.mid_block = middle_stage(p, spec)
        # The up path mirrors the down path: stage i of the up path pairs with down stage n-1-i.
        rev = p.num_blocks - 1
        self.up_blocks = nn.ModuleList(
            UpBlock(
                chans[max(rev - i - 1, 0)],
                chans[rev - i],
                chans[min(rev - i + 1, rev)],
                num_layers=p.layers[rev - i] + 1,
                attention=kind == "CrossAttnUpBlock2D",
                heads=p.heads[rev - i],
                context_dim=p.cross_dims[rev - i],
                depth=p.transformer_layers[rev - i],
                add_upsample=i < rev,
                spec=spec,
            )
            for i, kind in enumerate(p.up_block_types)
        )
        self.conv_norm_out = GroupNorm(p.norm_num_groups, chans[0], eps=p.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(chans[0], p.out_channels, p.conv_out_kernel, padding=p.conv_out_kernel // 2)

    def forward(
        self,
        sample: Float[Tensor, "batch c_in height width"],
        timestep: Tensor | float | int,
        encoder_hidden_states: Float[Tensor, "batch seq ctx"],
        *,
        added_cond_kwargs: Mapping[str, Tensor] | None = None,
        encoder_attention_mask: Tensor | None = None,
        down_block_additional_residuals: Sequence[Tensor] | None = None,
        mid_block_additional_residual: Tensor | None = None,
        cross_attention_extras: CrossAttentionExtras | None = None,
    ) -> Float[Tensor, "batch c_out height width"]:
        """Run the UNet.

        Args:
            sample: noisy latents.
            timestep: a number, a 0-d tensor, or one value per batch item.
            encoder_hidden_states: text embeddings.
            added_cond_kwargs: SDXL only: ``text_embeds`` (batch, pooled) and ``time_ids`` (batch, 6).
            encoder_attention_mask: (batch, seq), 1/True to attend to a token, 0/False to ignore it.
            down_block_additional_residuals: ControlNet residuals, one per skip connection.
            mid_block_additional_residual: ControlNet residual for the mid block output.
            cross_attention_extras: keys and values that cross-attention layers also attend to
                (IP-Adapter's image tokens), by layer; see :class:`~diffblocks.components.models.layers.Attention`.
        """
        if self.params.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.time_embedding(self.time_proj(batch_timesteps(timestep, sample)).to(sample.dtype))
        if self.add_embedding is not None:
            emb = emb + self._text_time_embedding(added_cond_kwargs, dtype=emb.dtype)
        # every ResNet reads the embedding through SiLU: apply it once here, not once per ResNet
        emb = nn.functional.silu(emb)
        mask = None
        if encoder_attention_mask is not None:
            # The additive bias diffusers uses (not -inf), so fully masked rows behave identically.
            mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0)[:, None, None, :]

        h = self.conv_in(sample)
        skips = [h]
        for down in self.down_blocks:
            h, res = down(h, emb, encoder_hidden_states, context_mask=mask, extras=cross_attention_extras)
            skips += res
        if down_block_additional_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals, strict=True)]
        h = self.mid_block(h, emb, encoder_hidden_states, context_mask=mask, extras=cross_attention_extras)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual
        for up in self.up_blocks:
            n = len(up.resnets)
            res, skips = skips[-n:], skips[:-n]
            # Upsample to the next skip's size so inputs not divisible by 2**stages still line up.
            size = skips[-1].shape[-2:] if skips else None
            h = up(h, res, emb, encoder_hidden_states, context_mask=mask, extras=cross_attention_extras, upsample_size=size)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))

    def _text_time_embedding(self, added: Mapping[str, Tensor] | None, *, dtype: torch.dtype) -> Tensor:
        """SDXL micro-conditioning: pooled text embedding + sinusoidal features of the six size ids."""
        assert self.add_time_proj is not None and self.add_embedding is not None
        return text_time_embedding(self.add_time_proj, self.add_embedding, added, dtype=dtype, model="UNet")


__all__ = ["UNet2DConditionModel"]
