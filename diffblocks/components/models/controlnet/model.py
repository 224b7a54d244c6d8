"""ControlNet for the UNet families (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, final

import torch
from jaxtyping import Float
from torch import Tensor, nn

from diffblocks.components.models.base import AbstractModel
from diffblocks.components.models.controlnet.params import CONTROLNET_FIXED_CONFIG, ControlNetParams
from diffblocks.components.models.controlnet.residuals import encoder_residuals, guess_mode_scales, skip_convs, zero_conv
from diffblocks.components.models.layers.resnet import ResnetBlock2D
from diffblocks.components.models.unet.blocks import StageSpec
from diffblocks.components.models.unet.model import encoder_stages, middle_stage
from diffblocks.components.models.unet.embeddings import batch_timesteps, text_time_embedding, time_embeddings
from diffblocks.components.models.unet.transformer import SpatialTransformer


@final
class ControlNetConditioningEmbedding(nn.Module):
    """The control image to latent size: convolutions with SiLU, stride 2 between widths, a zero-initialised last conv.

    Args:
        channels: the control image's channels.
        widths: the widths of the convolutions (diffusers' ``conditioning_embedding_out_channels``).
        out_channels: the ControlNet's first stage width, which the embedding is added to.
    """

    def __init__(self, channels: int, widths: tuple[int, ...], out_channels: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = zero_conv(nn.Conv2d(widths[-1], out_channels, 3, padding=1))

    def forward(self, image: Float[Tensor, "batch c height width"]) -> Float[Tensor, "batch out h w"]:
        x = nn.functional.silu(self.conv_in(image))
        for block in self.blocks:
            x = nn.functional.silu(block(x))
        return self.conv_out(x)


@final
class ControlNetModel(AbstractModel[ControlNetParams]):
    """The residuals a control image adds to a UNet's skip connections and mid block.

    A trainable copy of the UNet's encoder (the same :class:`DownBlock` and :class:`MidBlock`
    stages) reads the noisy latents plus an embedding of the control image; a zero-initialised
    1x1 convolution per skip connection and one after the mid block turn its features into
    residuals, in the order ``UNet2DConditionModel`` takes them (``down_block_additional_residuals``
    then ``mid_block_additional_residual``). Module and parameter names equal diffusers'
    ``ControlNetModel``, so its folders load unchanged.

    Args:
        params: the architecture; build from a diffusers config with :meth:`from_config`.

    Example:
        >>> net = ControlNetModel(ControlNetParams(block_out_channels=(32, 64), layers_per_block=1,
        ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32,
        ...     attention_head_dim=2, conditioning_embedding_out_channels=(16, 32)))
        >>> residuals = net(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 7, 32), torch.rand(1, 3, 16, 16))
        >>> [tuple(r.shape[1:]) for r in residuals]
        [(32, 8, 8), (32, 8, 8), (32, 4, 4), (64, 4, 4), (64, 4, 4)]
    """

    Params = ControlNetParams
    diffusers_class_name = "ControlNetModel"
    fixed_config: ClassVar[Mapping[str, object]] = CONTROLNET_FIXED_CONFIG
    repeated_blocks: ClassVar[tuple[type[nn.Module], ...]] = (ResnetBlock2D, SpatialTransformer)

    def __init__(self, params: ControlNetParams) -> None:
        super().__init__(params)
        p, unet = params, params.encoder()
        chans = p.block_out_channels
        spec = StageSpec(unet.time_embed_dim, p.norm_num_groups, p.norm_eps, 0.0, p.use_linear_projection)

        self.conv_in = nn.Conv2d(p.in_channels, chans[0], 3, padding=1)
        self.time_proj, self.time_embedding, self.add_time_proj, self.add_embedding = time_embeddings(unet)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            p.conditioning_channels, p.conditioning_embedding_out_channels, chans[0]
        )
        self.down_blocks = encoder_stages(unet, spec)
        self.controlnet_down_blocks = skip_convs(unet)
        self.mid_block = middle_stage(unet, spec)
        self.controlnet_mid_block = zero_conv(nn.Conv2d(chans[-1], chans[-1], 1))

    def forward(
        self,
        sample: Float[Tensor, "batch c_in height width"],
        timestep: Tensor | float | int,
        encoder_hidden_states: Float[Tensor, "batch seq ctx"],
        controlnet_cond: Float[Tensor, "batch c_cond img_height img_width"],
        *,
        conditioning_scale: float = 1.0,
        added_cond_kwargs: Mapping[str, Tensor] | None = None,
        encoder_attention_mask: Tensor | None = None,
        guess_mode: bool = False,
    ) -> tuple[Tensor, ...]:
        """The residuals for one UNet call: one per skip connection, then the mid block's, each times ``conditioning_scale``.

        Args:
            sample: noisy latents, as the UNet gets them.
            timestep: a number, a 0-d tensor, or one value per batch item.
            encoder_hidden_states: text embeddings.
            controlnet_cond: the control image in [0, 1], at ``vae_scale_factor`` times the latent size.
            conditioning_scale: how strongly the control acts (0: not at all).
            added_cond_kwargs: SDXL only: ``text_embeds`` and ``time_ids``, as for the UNet.
            encoder_attention_mask: (batch, seq), 1/True to attend to a token, 0/False to ignore it.
            guess_mode: scale the residuals from 0.1 at the first skip connection up to 1 at the
                mid block (log-spaced, times ``conditioning_scale``), as diffusers' guess mode does:
                the deep, semantic residuals act fully and the shallow ones barely, so the net can
                recognise the control image's content without a prompt.
        """
        if self.params.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        emb = self.time_embedding(self.time_proj(batch_timesteps(timestep, sample)).to(sample.dtype))
        if self.add_embedding is not None:
            emb = emb + self._text_time_embedding(added_cond_kwargs, dtype=emb.dtype)
        emb = nn.functional.silu(emb)  # every ResNet reads the embedding through SiLU (see the UNet)
        mask = None
        if encoder_attention_mask is not None:
            mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0)[:, None, None, :]

        h = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        out = encoder_residuals(self, h, emb, encoder_hidden_states, context_mask=mask)
        if guess_mode:
            scales = guess_mode_scales(len(out), sample.device) * conditioning_scale
            return tuple(r * scale for r, scale in zip(out, scales, strict=True))
        return tuple(r * conditioning_scale for r in out)

    def _text_time_embedding(self, added: Mapping[str, Tensor] | None, *, dtype: torch.dtype) -> Tensor:
        """SDXL micro-conditioning, as in the UNet: pooled text embedding + sinusoidal features of the size ids."""
        assert self.add_time_proj is not None and self.add_embedding is not None
        return text_time_embedding(self.add_time_proj, self.add_embedding, added, dtype=dtype, model="ControlNet")


__all__ = ["ControlNetConditioningEmbedding", "ControlNetModel"]
