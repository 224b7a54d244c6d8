"""ControlNet for the UNet families (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, final

import torch
from jaxtyping import Float
from torch import Tensor, nn

from diffblocks.components.models.base import AbstractModel
from diffblocks.components.models.controlnet.params import CONTROLNET_FIXED_CONFIG, ControlNetParams
from diffblocks.components.models.layers.resnet import ResnetBlock2D
from diffblocks.components.models.unet.blocks import StageSpec
from diffblocks.components.models.unet.model import encoder_stages, middle_stage
from diffblocks.components.models.unet.embeddings import TimestepEmbedding, Timesteps
from diffblocks.components.models.unet.transformer import SpatialTransformer

_MSG_TEXT_TIME = (
    "this ControlNet uses SDXL's text-time conditioning: pass added_cond_kwargs={{'text_embeds': (batch, dim), "
    "'time_ids': (batch, ids)}}, as for its UNet; got {got}"
)


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
        self.conv_out = _zero(nn.Conv2d(widths[-1], out_channels, 3, padding=1))

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
        self.time_proj = Timesteps(chans[0], flip_sin_to_cos=p.flip_sin_to_cos, freq_shift=p.freq_shift)
        self.time_embedding = TimestepEmbedding(chans[0], unet.time_embed_dim)
        self.add_time_proj: Timesteps | None = None
        self.add_embedding: TimestepEmbedding | None = None
        if p.addition_embed_type == "text_time":
            assert p.addition_time_embed_dim is not None and p.projection_class_embeddings_input_dim is not None
            self.add_time_proj = Timesteps(p.addition_time_embed_dim, flip_sin_to_cos=p.flip_sin_to_cos, freq_shift=p.freq_shift)
            self.add_embedding = TimestepEmbedding(p.projection_class_embeddings_input_dim, unet.time_embed_dim)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            p.conditioning_channels, p.conditioning_embedding_out_channels, chans[0]
        )
        self.down_blocks = encoder_stages(unet, spec)
        # one zero conv per skip connection, in the UNet's order: conv_in, then each stage's layers and downsampler
        widths = [chans[0]]
        for i in range(unet.num_blocks):
            widths += [chans[i]] * (unet.layers[i] + (i < unet.num_blocks - 1))
        self.controlnet_down_blocks = nn.ModuleList(_zero(nn.Conv2d(c, c, 1)) for c in widths)
        self.mid_block = middle_stage(unet, spec)
        self.controlnet_mid_block = _zero(nn.Conv2d(chans[-1], chans[-1], 1))

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
        emb = self.time_embedding(self.time_proj(_batch_timesteps(timestep, sample)).to(sample.dtype))
        if self.add_embedding is not None:
            emb = emb + self._text_time_embedding(added_cond_kwargs, dtype=emb.dtype)
        emb = nn.functional.silu(emb)  # every ResNet reads the embedding through SiLU (see the UNet)
        mask = None
        if encoder_attention_mask is not None:
            mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0)[:, None, None, :]

        h = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        skips = [h]
        for down in self.down_blocks:
            h, res = down(h, emb, encoder_hidden_states, context_mask=mask)
            skips += res
        h = self.mid_block(h, emb, encoder_hidden_states, context_mask=mask)
        out = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        out.append(self.controlnet_mid_block(h))
        if guess_mode:
            scales = torch.logspace(-1, 0, len(out), device=sample.device) * conditioning_scale
            return tuple(r * scale for r, scale in zip(out, scales, strict=True))
        return tuple(r * conditioning_scale for r in out)

    def _text_time_embedding(self, added: Mapping[str, Tensor] | None, *, dtype: torch.dtype) -> Tensor:
        """SDXL micro-conditioning, as in the UNet: pooled text embedding + sinusoidal features of the size ids."""
        assert self.add_time_proj is not None and self.add_embedding is not None
        if added is None or "text_embeds" not in added or "time_ids" not in added:
            raise ValueError(_MSG_TEXT_TIME.format(got="None" if added is None else sorted(added)))
        text, time_ids = added["text_embeds"], added["time_ids"]
        time_feats = self.add_time_proj(time_ids.flatten()).reshape(text.shape[0], -1)
        return self.add_embedding(torch.cat([text, time_feats], dim=-1).to(dtype))


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    """A convolution that starts at zero, so a new ControlNet leaves its UNet unchanged (the paper's "zero convolution")."""
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _batch_timesteps(timestep: Tensor | float | int, sample: Tensor) -> Tensor:
    """One timestep per batch item, on the sample's device."""
    if not isinstance(timestep, Tensor):
        timestep = torch.tensor([timestep], device=sample.device)
    elif timestep.ndim == 0:
        timestep = timestep[None].to(sample.device)
    return timestep.expand(sample.shape[0])


__all__ = ["ControlNetConditioningEmbedding", "ControlNetModel"]
