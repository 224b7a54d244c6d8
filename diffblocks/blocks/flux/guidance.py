"""Flux.1 guidance set-up, once per call: dev's embedded guidance, and optional true CFG through the guider."""

from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import Field

from diffblocks.blocks.block import Block, BlockIO, component, known
from diffblocks.blocks.errors import FieldError
from diffblocks.blocks.fields import produced
from diffblocks.blocks.sd.encode import Prompt
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
    """Set up this call's guidance before the prompts are encoded: dev's embedded guidance and the guider for true CFG.

    ``guidance_scale`` is dev's distilled guidance: the transformer embeds it, one forward per step
    (schnell has no guidance embedder and ignores it). True classifier-free guidance is the
    guider's job: its scale is ``true_cfg_scale`` when given, and the default guider's scale of 1
    runs no extra pass; above 1 each step also predicts from ``negative_prompt``, as diffusers'
    ``FluxPipeline`` does with ``true_cfg_scale > 1``. A negative prompt is required only when the
    guider asks for an unconditional pass at one of the run's steps: perturbing guiders made with
    ``for_family("flux")`` guide with their perturbed pass alone and need none. That is known once
    the step count is (after :class:`FluxDefaults`), so it is checked here, before any encoder runs.

    The guider is checked before the call runs: its perturbed layers against the transformer, and
    its settings against Flux's packed ``(batch, tokens, channels)`` predictions (so
    frequency-decoupled guidance, which needs image-shaped predictions, is refused up front).
    """

    class Inputs(BlockIO):
        guidance_scale: float = Field(3.5, ge=0.0, description="dev's embedded guidance; schnell ignores it")
        true_cfg_scale: float | None = Field(
            None, ge=0.0, description="classifier-free guidance against negative_prompt; overrides the guider's scale"
        )
        negative_prompt: Prompt | None = Field(None, description="what true CFG steers away from (see true_cfg_scale)")
        num_inference_steps: int

    class Outputs(BlockIO):
        call_guider: AbstractGuider
        embedded_guidance: Float["one"] | None

    guider: AbstractGuider = component(description="true guidance (CFG, APG, PAG, ...); scale 1 turns CFG off")
    transformer: FluxTransformer2DModel = component()

    def check(self, inputs: Inputs) -> None:
        guider = self.guider_for(known(inputs, "true_cfg_scale"))
        check_guider(guider, model=self.transformer, shape=(None, None, None))  # packed tokens

    def __call__(self, inputs: Inputs) -> Outputs:
        scale = inputs.true_cfg_scale
        guider = self.guider_for(scale)
        if inputs.negative_prompt is None and needs_unconditional(guider, inputs.num_inference_steps):
            if scale is not None:
                message = _MSG_NO_NEGATIVE.format(who=f"true_cfg_scale {scale}", fix=_FIX_SCALE)
            else:
                message = _MSG_NO_NEGATIVE.format(who=f"the guider {guider!r}", fix=_FIX_GUIDER)
            raise FieldError("negative_prompt", message)
        embedded = None
        if self.transformer.params.guidance_embeds:
            device = placement(self.transformer)[0]
            embedded = torch.full([1], inputs.guidance_scale, device=device, dtype=torch.float32)
        return self.Outputs(call_guider=guider, embedded_guidance=embedded)

    def guider_for(self, true_cfg_scale: float | None) -> AbstractGuider:
        """The guider with this call's ``true_cfg_scale`` as its guidance scale."""
        guider = self.guider
        if true_cfg_scale is None:
            return guider
        if "guidance_scale" not in type(guider).model_fields:
            raise FieldError("true_cfg_scale", f"{type(guider).__name__} has no guidance_scale to set from true_cfg_scale")
        settings = guider.model_dump()
        if settings["guidance_scale"] == true_cfg_scale:
            return guider
        return type(guider).model_validate({**settings, "guidance_scale": true_cfg_scale})


class PrepareFluxConditions(Block):
    """Complete the conditioning for the transformer (token positions, dev's guidance) and pair it for the guider's passes."""

    class Inputs(BlockIO):
        conditioning: Conditioning = produced(description="the prompt's embeddings")
        negative_conditioning: Conditioning | None = produced(description="the negative prompt's embeddings")
        image_ids: Float["seq 3"] = produced(description="the latent tokens' positions")
        embedded_guidance: Float["one"] | None = produced(description="dev's embedded guidance scale")
        call_guider: AbstractGuider = produced(description="the guider with this call's settings")
        guidance_batched: bool = Field(True, description="run the true CFG passes as one batched forward")

    class Outputs(BlockIO):
        guidance: Guidance

    transformer: FluxTransformer2DModel = component()

    def __call__(self, inputs: Inputs) -> Outputs:
        device, dtype = placement(self.transformer)
        text_ids = prepare_text_ids(inputs.conditioning.prompt_embeds.shape[1], device=device, dtype=dtype)
        shared = {"text_ids": text_ids, "image_ids": inputs.image_ids, "embedded_guidance": inputs.embedded_guidance}
        conditions = {"cond": replace(inputs.conditioning.to(device, dtype), **shared)}
        if inputs.negative_conditioning is not None:
            conditions["uncond"] = replace(inputs.negative_conditioning.to(device, dtype), **shared)
        guider = inputs.call_guider
        guidance = Guidance(guider, guider.new_state(), GuidanceConditions(conditions), inputs.guidance_batched)
        return self.Outputs(guidance=guidance)
