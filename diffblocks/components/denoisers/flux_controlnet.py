"""Flux ControlNets at one step: their residuals, spread over the transformer's blocks, for the Flux denoiser."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import final

from jaxtyping import Float, Int
from torch import Tensor

from diffblocks.components.denoisers.conditioning import Conditioning
from diffblocks.components.models.controlnet.flux import FluxControlNetModel, flux_block_residuals, sum_residuals
from diffblocks.components.models.flux import FluxTransformer2DModel

_MSG_MISSING = (
    "a Flux ControlNet needs Conditioning.pooled_embeds, text_ids and image_ids, and {field} is None: "
    "run it on the conditioning that PrepareFluxConditions completes"
)


@final
@dataclass(frozen=True, slots=True, eq=False)
class FluxControl:
    """One Flux ControlNet with its control image and settings for one call.

    Args:
        model: the ControlNet.
        image: the control image as the net reads it, with the run's batch, on its device and
            dtype: packed VAE latents ``(batch, tokens, channels)`` (InstantX, Union), or pixels in
            [-1, 1] ``(batch, 3, height, width)`` (XLabs).
        mode: a union net's control mode per batch item ``(batch, 1)``; None for other nets.
        scale: ``controlnet_conditioning_scale``: its residuals are multiplied by it.
        start, end: ``control_guidance_start`` and ``control_guidance_end``, the fractions of the
            steps between which the ControlNet acts.
    """

    model: FluxControlNetModel
    image: Float[Tensor, "batch ..."]
    mode: Int[Tensor, "batch 1"] | None = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def active(self, step_index: int, num_steps: int) -> bool:
        """Whether it acts at ``step_index`` of ``num_steps``: diffusers' ``controlnet_keep`` (see ``Control.active``)."""
        return not (step_index / num_steps < self.start or (step_index + 1) / num_steps > self.end)


def flux_control_residuals(
    controls: Sequence[FluxControl], x: Float[Tensor, "batch seq c"], t: Tensor, conditioning: Conditioning,
    *, transformer: FluxTransformer2DModel,
) -> tuple[Tensor, ...] | None:  # fmt: skip
    """The summed residuals of ``controls`` for ``transformer``'s blocks, or None when there are no controls.

    Each net runs on the same tokens, sigma (``t / 1000``, ``t`` in the latents' dtype), prompt
    and embedded guidance as the transformer, as diffusers' ``FluxControlNetPipeline`` runs it;
    its residuals are spread over the transformer's blocks (:func:`flux_block_residuals`) and the
    nets' are added in order. Put them in ``Conditioning.control_residuals`` for
    :class:`~diffblocks.components.denoisers.FluxDenoiser`.
    """
    pooled, text_ids, image_ids = conditioning.pooled_embeds, conditioning.text_ids, conditioning.image_ids
    if pooled is None or text_ids is None or image_ids is None:
        field = "pooled_embeds" if pooled is None else "text_ids" if text_ids is None else "image_ids"
        raise ValueError(_MSG_MISSING.format(field=field))
    n, p = x.shape[0], transformer.params
    sigma = (t.to(x.dtype) / 1000).expand(n)
    residuals: tuple[Tensor, ...] | None = None
    for control in controls:
        guidance = conditioning.embedded_guidance if control.model.params.guidance_embeds else None
        out = control.model(
            x,
            control.image,
            encoder_hidden_states=conditioning.prompt_embeds,
            pooled_projections=pooled,
            timestep=sigma,
            img_ids=image_ids,
            txt_ids=text_ids,
            guidance=None if guidance is None else guidance.expand(n),
            controlnet_mode=control.mode,
            conditioning_scale=control.scale,
        )
        spread = flux_block_residuals(
            out, num_layers=p.num_layers, num_single_layers=p.num_single_layers, repeat=control.model.repeats_blocks
        )
        residuals = sum_residuals(residuals, spread)
    return residuals


__all__ = ["FluxControl", "flux_control_residuals"]
