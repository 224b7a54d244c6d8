"""The denoiser wrapper of the conditional UNets (SD 1.x/2.x, SDXL, the tiny model)."""

from __future__ import annotations

from functools import partial
from typing import final

import torch
from jaxtyping import Float
from torch import Tensor

from diffblocks.components.denoisers.base import AbstractDenoiser, Predict, PredictionType
from diffblocks.components.denoisers.conditioning import Conditioning
from diffblocks.components.memory.reserve import reserve_step
from diffblocks.components.memory.steps import StepShape, unet_shape
from diffblocks.components.models.ip_adapter import IPAdapterModel, MultiIPAdapterModel, cross_attention_extras
from diffblocks.components.models.unet import UNet2DConditionModel

_MSG_IMAGE_EMBEDS = (
    "Conditioning.image_embeds is set, but no IP-Adapter is attached to this UNet's denoiser to read them: "
    "give UNetDenoiser(unet, ip_adapter=...) or leave image_embeds None"
)


@final
class UNetDenoiser(AbstractDenoiser):
    """A UNet as a denoiser: ``prompt_embeds`` to cross-attention, SDXL's pooled embeddings and time ids to the added embedding.

    The UNet takes the scheduler's timestep as it is. ``prompt_mask`` becomes its
    ``encoder_attention_mask``, ``control_residuals`` its ControlNet residuals (all but the last
    to the skip connections, the last to the mid block). With an IP-Adapter attached,
    ``image_embeds`` (one tensor of projected image tokens per adapter) become the image keys and
    values its cross-attention layers also attend to, made once per pass.

    Args:
        unet: the UNet.
        prediction_type: what the checkpoint was trained to predict; diffusers keeps it in the
            scheduler config (``prediction_type``), so the denoise block passes the scheduler's.
        ip_adapter: the IP-Adapter(s) that read ``image_embeds``; None refuses them.

    Example:
        >>> unet = UNet2DConditionModel.from_config({"block_out_channels": (8, 16), "layers_per_block": 1,
        ...     "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "norm_num_groups": 4,
        ...     "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 8,
        ...     "attention_head_dim": 2}).eval()
        >>> denoiser = UNetDenoiser(unet)
        >>> x, t, embeds = torch.randn(1, 4, 8, 8), torch.tensor(10), torch.randn(1, 5, 8)
        >>> with torch.no_grad():
        ...     assert torch.equal(denoiser(x, t, Conditioning(embeds)), unet(x, t, embeds))
    """

    __slots__ = ("ip_adapter", "model", "prediction_type")

    model: UNet2DConditionModel

    def __init__(
        self,
        unet: UNet2DConditionModel,
        *,
        prediction_type: PredictionType = "epsilon",
        ip_adapter: IPAdapterModel | MultiIPAdapterModel | None = None,
    ) -> None:
        self.model = unet
        self.prediction_type = prediction_type
        self.ip_adapter = ip_adapter

    def __call__(self, x: Float[Tensor, "batch c h w"], t: Tensor, conditioning: Conditioning) -> Float[Tensor, "batch c h w"]:
        return self._predict(t, x, conditioning)

    def at(self, t: Tensor) -> Predict:
        return partial(self._predict, t)

    def _predict(self, t: Tensor, x: Tensor, c: Conditioning) -> Tensor:
        # Where the conditioning becomes UNet arguments: an IP-Adapter attached to this wrapper reads
        # c.image_embeds here, and a ControlNetDenoiser wrapped around it hands in c.control_residuals.
        extras = None
        if c.image_embeds is not None:
            if self.ip_adapter is None:
                raise ValueError(_MSG_IMAGE_EMBEDS)
            extras = cross_attention_extras(self.ip_adapter, self.model, c.image_embeds)
        # under a memory budget, the manager reserves this forward's activations first (once per size)
        residuals = c.control_residuals
        reserve_step(self.model, x, partial(_step_shape, self.model, x), held=residuals)
        added = None
        if c.pooled_embeds is not None or c.time_ids is not None:
            added = {k: v for k, v in (("text_embeds", c.pooled_embeds), ("time_ids", c.time_ids)) if v is not None}
        return self.model(
            x,
            t,
            c.prompt_embeds,
            encoder_attention_mask=c.prompt_mask,
            added_cond_kwargs=added,
            down_block_additional_residuals=None if residuals is None else residuals[:-1],
            mid_block_additional_residual=None if residuals is None else residuals[-1],
            cross_attention_extras=extras,
        )


def _step_shape(unet: UNet2DConditionModel, x: Tensor) -> StepShape:
    """The UNet's widest attention for latents ``x`` (8 image pixels per latent pixel, per side)."""
    return unet_shape(unet.to_config(), height=x.shape[-2] * 8, width=x.shape[-1] * 8)


__all__ = ["UNetDenoiser"]
