"""ControlNet-Union for SDXL (Xinsir's ControlNet++; diffusers ``ControlNetUnionModel`` compatible)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, final

import torch
from jaxtyping import Float
from torch import Tensor, nn

from diffblocks.components.models.base import AbstractModel
from diffblocks.components.models.controlnet.model import ControlNetConditioningEmbedding
from diffblocks.components.models.controlnet.params import CONTROLNET_FIXED_CONFIG, ControlNetUnionParams
from diffblocks.components.models.controlnet.residuals import encoder_residuals, guess_mode_scales, skip_convs, zero_conv
from diffblocks.components.models.layers.resnet import ResnetBlock2D
from diffblocks.components.models.unet.blocks import StageSpec
from diffblocks.components.models.unet.embeddings import TimestepEmbedding, Timesteps, batch_timesteps, text_time_embedding, time_embeddings
from diffblocks.components.models.unet.model import encoder_stages, middle_stage
from diffblocks.components.models.unet.transformer import SpatialTransformer

_MSG_IMAGES = "the ControlNet-Union got {images} control images for {modes} control modes: give one image per mode"
_MSG_MODE = "this ControlNet-Union knows {n} control types (0..{last}), got control_mode {got}: pick the mode its model card gives"


@final
class FusionBlock(nn.Module):
    """One pre-norm transformer layer (attention, then a QuickGELU MLP) that mixes the control images' features.

    It keeps the original's layout: ``nn.MultiheadAttention`` without ``batch_first``, so the
    tokens of one image attend across the batch axis given as ``(batch, tokens, channels)``; the
    released weights were trained that way, and parity needs the same.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", _QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: Float[Tensor, "batch tokens width"]) -> Float[Tensor, "batch tokens width"]:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _QuickGELU(nn.Module):
    """GELU's sigmoid approximation ``x * sigmoid(1.702 x)`` (Hendrycks & Gimpel 2016), as CLIP uses it."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


@final
class ControlNetUnionModel(AbstractModel[ControlNetUnionParams]):
    """One SDXL ControlNet for several kinds of control image (canny, depth, pose, ...), alone or together.

    As :class:`~diffblocks.components.models.controlnet.ControlNetModel`, a copy of the UNet's
    encoder gives one residual per skip connection and one for the mid block. The control images
    are embedded each by the same convolutional encoder; their mean features plus a learnt
    embedding of their control type, and the latents' mean features, pass through a small
    transformer, whose outputs shift each image's features before they are summed into the first
    stage. The set of control types present is also embedded, like SDXL's size ids, into the time
    embedding. Module and parameter names equal diffusers' ``ControlNetUnionModel``.

    Args:
        params: the architecture; build from a diffusers config with :meth:`from_config`.
    """

    Params = ControlNetUnionParams
    diffusers_class_name = "ControlNetUnionModel"
    fixed_config: ClassVar[Mapping[str, object]] = CONTROLNET_FIXED_CONFIG
    repeated_blocks: ClassVar[tuple[type[nn.Module], ...]] = (ResnetBlock2D, SpatialTransformer)

    def __init__(self, params: ControlNetUnionParams) -> None:
        super().__init__(params)
        p, unet = params, params.encoder()
        chans = p.block_out_channels
        spec = StageSpec(unet.time_embed_dim, p.norm_num_groups, p.norm_eps, 0.0, p.use_linear_projection)
        assert p.addition_time_embed_dim is not None  # checked by the params

        self.conv_in = nn.Conv2d(p.in_channels, chans[0], 3, padding=1)
        self.time_proj, self.time_embedding, self.add_time_proj, self.add_embedding = time_embeddings(unet)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            p.conditioning_channels, p.conditioning_embedding_out_channels, chans[0]
        )
        self.task_embedding = nn.Parameter(p.num_trans_channel**0.5 * torch.randn(p.num_control_type, p.num_trans_channel))
        self.transformer_layes = nn.ModuleList(FusionBlock(p.num_trans_channel, p.num_trans_head) for _ in range(p.num_trans_layer))
        self.spatial_ch_projs = nn.Linear(p.num_trans_channel, p.num_proj_channel)
        nn.init.zeros_(self.spatial_ch_projs.weight)
        nn.init.zeros_(self.spatial_ch_projs.bias)
        self.control_type_proj = Timesteps(p.addition_time_embed_dim, flip_sin_to_cos=p.flip_sin_to_cos, freq_shift=p.freq_shift)
        self.control_add_embedding = TimestepEmbedding(p.addition_time_embed_dim * p.num_control_type, unet.time_embed_dim)
        self.down_blocks = encoder_stages(unet, spec)
        self.controlnet_down_blocks = skip_convs(unet)
        self.mid_block = middle_stage(unet, spec)
        self.controlnet_mid_block = zero_conv(nn.Conv2d(chans[-1], chans[-1], 1))

    def forward(
        self,
        sample: Float[Tensor, "batch c_in height width"],
        timestep: Tensor | float | int,
        encoder_hidden_states: Float[Tensor, "batch seq ctx"],
        controlnet_cond: Sequence[Float[Tensor, "batch c_cond img_height img_width"]],
        control_type: Float[Tensor, "batch num_control_type"],
        control_type_idx: Sequence[int],
        *,
        conditioning_scale: float | Sequence[float] = 1.0,
        added_cond_kwargs: Mapping[str, Tensor] | None = None,
        guess_mode: bool = False,
        from_multi: bool = False,
    ) -> tuple[Tensor, ...]:
        """The residuals for one UNet call: one per skip connection, then the mid block's.

        Args:
            sample: noisy latents, as the UNet gets them.
            timestep: a number, a 0-d tensor, or one value per batch item.
            encoder_hidden_states: text embeddings.
            controlnet_cond: one control image in [0, 1] per control type used.
            control_type: one-hot (or several-hot) ``(batch, num_control_type)``: the types used.
            control_type_idx: the control type of each image of ``controlnet_cond``.
            conditioning_scale: one scale, or one per image. With one image (or ``from_multi``)
                the residuals are scaled by the first; with several, each image's features are.
            added_cond_kwargs: SDXL's ``text_embeds`` and ``time_ids``, as for the UNet.
            guess_mode: log-spaced residual scales, as :class:`ControlNetModel` in guess mode.
            from_multi: diffusers' flag for a union run inside a multi-ControlNet.
        """
        p = self.params
        if len(controlnet_cond) != len(control_type_idx):
            raise ValueError(_MSG_IMAGES.format(images=len(controlnet_cond), modes=len(control_type_idx)))
        for idx in control_type_idx:
            if not 0 <= idx < p.num_control_type:
                raise ValueError(_MSG_MODE.format(n=p.num_control_type, last=p.num_control_type - 1, got=idx))
        scales = [conditioning_scale] * len(controlnet_cond) if isinstance(conditioning_scale, (float, int)) else list(conditioning_scale)
        outer = from_multi or len(control_type_idx) == 1  # whether the residuals, not the image features, are scaled

        t_emb = self.time_proj(batch_timesteps(timestep, sample)).to(sample.dtype)
        emb = self.time_embedding(t_emb)
        types = self.control_type_proj(control_type.flatten()).reshape(t_emb.shape[0], -1).to(emb.dtype)
        emb = emb + self.control_add_embedding(types)
        if self.add_embedding is not None:
            emb = emb + self._text_time_embedding(added_cond_kwargs, dtype=emb.dtype)
        emb = nn.functional.silu(emb)  # every ResNet reads the embedding through SiLU (see the UNet)

        h = self.conv_in(sample)
        tokens, conditions = [], []
        for cond, idx, scale in zip(controlnet_cond, control_type_idx, scales, strict=True):
            condition = self.controlnet_cond_embedding(cond)
            token = (torch.mean(condition, dim=(2, 3)) + self.task_embedding[idx]).unsqueeze(1)
            tokens.append(token if outer else token * scale)
            conditions.append(condition if outer else condition * scale)
        tokens.append(torch.mean(h, dim=(2, 3)).unsqueeze(1))
        x = torch.cat(tokens, dim=1)
        for layer in self.transformer_layes:
            x = layer(x)
        fused = h * 0.0
        for i, (condition, scale) in enumerate(zip(conditions, scales, strict=True)):
            alpha = self.spatial_ch_projs(x[:, i])[:, :, None, None]
            fused += condition + (alpha if outer else alpha * scale)
        h = h + fused

        out = encoder_residuals(self, h, emb, encoder_hidden_states)
        if guess_mode:
            factors = guess_mode_scales(len(out), sample.device)
            if outer:
                factors = factors * scales[0]
            return tuple(r * f for r, f in zip(out, factors, strict=True))
        if outer:
            return tuple(r * scales[0] for r in out)
        return tuple(out)

    def _text_time_embedding(self, added: Mapping[str, Tensor] | None, *, dtype: torch.dtype) -> Tensor:
        """SDXL micro-conditioning, as in the UNet: pooled text embedding + sinusoidal features of the size ids."""
        assert self.add_time_proj is not None and self.add_embedding is not None
        return text_time_embedding(self.add_time_proj, self.add_embedding, added, dtype=dtype, model="ControlNet-Union")


__all__ = ["ControlNetUnionModel", "FusionBlock"]
