"""Flux.1 guidance set-up, once per call: dev's embedded guidance, and optional true CFG through the guider."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from pydantic import Field

from diffblocks.blocks.block import Block, BlockIO, component
from diffblocks.blocks.errors import FieldError
from diffblocks.blocks.flux.defaults import resolve_steps
from diffblocks.blocks.standard.guidance import Guidance, check_guider
from diffblocks.blocks.standard.latents import placement
from diffblocks.blocks.types import Float
from diffblocks.components.denoisers import Conditioning
from diffblocks.components.guiders import AbstractGuider, GuidanceConditions
from diffblocks.components.models.flux import FluxTransformer2DModel, prepare_text_ids

_MSG_NO_NEGATIVE = (
    "{who} makes an unconditional prediction, which Flux makes from a negative prompt, and none was given: "
    'pass negative_prompt ("" for the empty prompt), or {fix}'
)
_FIX_SCALE = "leave true_cfg_scale at 1 (off)"
_FIX_GUIDER = (
    "turn the guider's classifier-free guidance off (guidance_scale=1; perturbing guiders made with "
    'for_family("flux") guide with their perturbed pass alone)'
)


def needs_unconditional(guider: AbstractGuider, num_steps: int) -> bool:
    """Whether ``guider`` asks for an unconditional pass at any of ``num_steps`` steps."""
    return any(p.condition == "uncond" for i in range(num_steps) for p in guider.passes(i, num_steps))


class PrepareFluxGuidance(Block):
    """Complete the conditioning for the transformer (positions, dev's guidance), and set the guider for true CFG.

    ``guidance_scale`` is dev's distilled guidance: the transformer embeds it, one forward per step
    (schnell has no guidance embedder and ignores it). True classifier-free guidance is the
    guider's job: its scale is ``true_cfg_scale`` when given, and the default guider's scale of 1
    runs no extra pass; above 1 each step also predicts from ``negative_prompt``, as diffusers'
    ``FluxPipeline`` does with ``true_cfg_scale > 1``. A negative prompt is required only when the
    guider asks for an unconditional pass: perturbing guiders made with ``for_family("flux")``
    guide with their perturbed pass alone and need none.

    The guider is checked before the call runs: its perturbed layers against the transformer, and
    its settings against Flux's packed ``(batch, tokens, channels)`` predictions (so
    frequency-decoupled guidance, which needs image-shaped predictions, is refused up front).

    Each conditioning is moved to the transformer's device and dtype and given what every pass
    shares: the text and image token positions, and dev's embedded guidance (float32, as diffusers
    makes it).
    """

    class Inputs(BlockIO):
        conditioning: Conditioning
        negative_conditioning: Conditioning | None
        image_ids: Float["seq 3"]
        guidance_scale: float = Field(3.5, ge=0.0, description="dev's embedded guidance; schnell ignores it")
        true_cfg_scale: float | None = Field(
            None, ge=0.0, description="classifier-free guidance against negative_prompt; overrides the guider's scale"
        )
        guidance_batched: bool = Field(True, description="run the true CFG passes as one batched forward")

    class Outputs(BlockIO):
        guidance: Guidance

    guider: AbstractGuider = component(description="true guidance (CFG, APG, PAG, ...); scale 1 turns CFG off")
    transformer: FluxTransformer2DModel = component()

    def check(self, user_inputs: Mapping[str, Any]) -> None:
        scale = user_inputs.get("true_cfg_scale")
        guider = self._guider(scale)
        check_guider(guider, model=self.transformer, shape=(None, None, None))  # packed tokens
        if user_inputs.get("negative_prompt") is None:
            steps = resolve_steps(user_inputs.get("num_inference_steps"), user_inputs.get("sigmas"), self.transformer)
            if needs_unconditional(guider, steps):
                if scale is not None:
                    message = _MSG_NO_NEGATIVE.format(who=f"true_cfg_scale {scale}", fix=_FIX_SCALE)
                else:
                    message = _MSG_NO_NEGATIVE.format(who=f"the guider {guider!r}", fix=_FIX_GUIDER)
                raise FieldError("negative_prompt", message)

    def __call__(self, inputs: Inputs) -> Outputs:
        device, dtype = placement(self.transformer)
        embedded = None
        if self.transformer.params.guidance_embeds:
            embedded = torch.full([1], inputs.guidance_scale, device=device, dtype=torch.float32)
        text_ids = prepare_text_ids(inputs.conditioning.prompt_embeds.shape[1], device=device, dtype=dtype)
        shared = {"text_ids": text_ids, "image_ids": inputs.image_ids, "embedded_guidance": embedded}
        conditions = {"cond": replace(inputs.conditioning.to(device, dtype), **shared)}
        if inputs.negative_conditioning is not None:
            conditions["uncond"] = replace(inputs.negative_conditioning.to(device, dtype), **shared)
        guider = self._guider(inputs.true_cfg_scale)
        guidance = Guidance(guider, guider.new_state(), GuidanceConditions(conditions), inputs.guidance_batched)
        return self.Outputs(guidance=guidance)

    def _guider(self, true_cfg_scale: float | None) -> AbstractGuider:
        guider = self.guider
        if true_cfg_scale is None:
            return guider
        if "guidance_scale" not in type(guider).model_fields:
            raise FieldError("true_cfg_scale", f"{type(guider).__name__} has no guidance_scale to set from true_cfg_scale")
        settings = guider.model_dump()
        if settings["guidance_scale"] == true_cfg_scale:
            return guider
        return type(guider).model_validate({**settings, "guidance_scale": true_cfg_scale})

