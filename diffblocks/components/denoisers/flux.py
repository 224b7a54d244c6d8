"""The denoiser wrapper of the Flux.1 transformer (dev and schnell)."""

from __future__ import annotations

from functools import partial
from typing import final

import torch
from jaxtyping import Float
from torch import Tensor

from diffblocks.components.denoisers.base import AbstractDenoiser, Predict, PredictionType
from diffblocks.components.denoisers.conditioning import Conditioning
from diffblocks.components.memory.reserve import reserve_step
from diffblocks.components.memory.steps import flux_tokens_shape
from diffblocks.components.models.flux import FluxTransformer2DModel
from diffblocks.components.models.ip_adapter.flux import FluxIPAdapterModel, MultiFluxIPAdapterModel, flux_image_prompt

_MSG_MISSING = (
    "the Flux transformer needs Conditioning.pooled_embeds, text_ids and image_ids, and {field} is None: "
    "FluxEncodePrompt makes the pooled embeddings, PrepareFluxGuidance adds the token positions "
    "(see prepare_text_ids and prepare_image_ids)"
)
_MSG_IMAGE_EMBEDS = (
    "Conditioning.image_embeds is set, but no IP-Adapter is attached to the Flux denoiser to read them: "
    "give FluxDenoiser(transformer, ip_adapter=...) or leave image_embeds None"
)


@final
class FluxDenoiser(AbstractDenoiser):
    """The Flux transformer as a denoiser of packed latent tokens; it predicts the flow.

    The transformer takes ``t / 1000`` (a sigma in 0..1), computed in the latents' dtype as
    diffusers' ``FluxPipeline`` computes it, and, for dev, the embedded guidance; both are expanded
    to the batch of each pass. ``prompt_embeds`` are the T5 tokens, ``pooled_embeds`` the pooled
    CLIP vector, and the shared ``text_ids`` and ``image_ids`` their positions. With an IP-Adapter
    attached, ``image_embeds`` (one tensor of projected image tokens per adapter) become the image
    keys and values the double blocks also attend to, made once per pass.

    Args:
        transformer: the Flux transformer.
        ip_adapter: the Flux IP-Adapter(s) that read ``image_embeds``; None refuses them.

    Example:
        >>> from diffblocks.components.models.flux import FluxParams, prepare_image_ids, prepare_text_ids
        >>> transformer = FluxTransformer2DModel(FluxParams(in_channels=8, num_layers=1, num_single_layers=1,
        ...     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
        ...     axes_dims_rope=(2, 2, 4), guidance_embeds=False)).eval()
        >>> c = Conditioning(torch.randn(1, 5, 16), pooled_embeds=torch.randn(1, 8),
        ...     text_ids=prepare_text_ids(5), image_ids=prepare_image_ids(2, 3))
        >>> x, t = torch.randn(1, 6, 8), torch.tensor(700.0)
        >>> with torch.no_grad():
        ...     flow = FluxDenoiser(transformer)(x, t, c)
        ...     direct = transformer(x, encoder_hidden_states=c.prompt_embeds, pooled_projections=c.pooled_embeds,
        ...         timestep=torch.tensor([0.7]), img_ids=c.image_ids, txt_ids=c.text_ids)
        >>> assert torch.equal(flow, direct)
    """

    __slots__ = ("ip_adapter", "model")

    model: FluxTransformer2DModel
    prediction_type: PredictionType = "flow"

    def __init__(self, transformer: FluxTransformer2DModel, *, ip_adapter: FluxIPAdapterModel | MultiFluxIPAdapterModel | None = None) -> None:
        self.model = transformer
        self.ip_adapter = ip_adapter

    def __call__(self, x: Float[Tensor, "batch seq c"], t: Tensor, conditioning: Conditioning) -> Float[Tensor, "batch seq c"]:
        return self.at(t.to(x.dtype))(x, conditioning)

    def at(self, t: Tensor) -> Predict:
        """The transformer at timestep ``t``, which comes in the latents' dtype (diffusers rounds it there before scaling)."""
        return partial(self._predict, t / 1000)

    def _predict(self, sigma: Tensor, x: Tensor, c: Conditioning) -> Tensor:
        # Where the conditioning becomes transformer arguments: an IP-Adapter attached here reads c.image_embeds.
        pooled, text_ids, image_ids = c.pooled_embeds, c.text_ids, c.image_ids
        if pooled is None or text_ids is None or image_ids is None:
            field = "pooled_embeds" if pooled is None else "text_ids" if text_ids is None else "image_ids"
            raise ValueError(_MSG_MISSING.format(field=field))
        image_prompt = None
        if c.image_embeds is not None:
            if self.ip_adapter is None:
                raise ValueError(_MSG_IMAGE_EMBEDS)
            image_prompt = flux_image_prompt(self.ip_adapter, c.image_embeds)
        n, guidance = x.shape[0], c.embedded_guidance
        # under a memory budget, the manager reserves this forward's activations first (once per size)
        text = c.prompt_embeds.shape[1]
        reserve_step(self.model, x, lambda: flux_tokens_shape(self.model.to_config(), image_tokens=x.shape[1], text_tokens=text),
                     text_tokens=text, held=c.control_residuals)
        return self.model(
            x,
            encoder_hidden_states=c.prompt_embeds,
            pooled_projections=pooled,
            timestep=sigma.expand(n),
            img_ids=image_ids,
            txt_ids=text_ids,
            guidance=None if guidance is None else guidance.expand(n),
            block_residuals=c.control_residuals,  # a Flux ControlNet's, one per block (see FluxControl)
            image_prompt=image_prompt,
        )


__all__ = ["FluxDenoiser"]
