"""Guidance set-up, once per call: the guider with the call's overrides, its state, and the conditions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import Field
from torch import Tensor, nn

from diffblocks.blocks.block import Block, BlockIO, component
from diffblocks.blocks.errors import FieldError
from diffblocks.components.guiders import AbstractGuider, GuidanceConditions, GuiderState, guided_prediction
from diffblocks.components.guiders.run import Predict


@dataclass(frozen=True, slots=True)
class Guidance:
    """What the denoise step needs from guidance, fixed for one call."""

    guider: AbstractGuider
    state: GuiderState | None
    conditions: GuidanceConditions
    batched: bool

    def prediction(self, predict: Predict, *, latents: Tensor, step_index: int, num_steps: int, model: nn.Module) -> Tensor:
        """The guided prediction at one step: :func:`guided_prediction` with this call's guider, state and conditions.

        Args:
            predict: the denoiser at this step, with the inputs every pass shares bound in.
            latents: ``(batch, ...)`` model input at this step.
            step_index: index of this step, from 0.
            num_steps: number of denoising steps.
            model: the module ``predict`` runs (perturbed passes hook into it).
        """
        return guided_prediction(
            self.guider,
            state=self.state,
            predict=predict,
            latents=latents,
            conditions=self.conditions,
            step_index=step_index,
            num_steps=num_steps,
            model=model,
            batched=self.batched,
        )


class PrepareGuidance(Block):
    """Apply per-call overrides (``guidance_scale``) to the guider and pair the conditions for its passes."""

    class Inputs(BlockIO):
        conditioning: dict[str, Tensor]
        negative_conditioning: dict[str, Tensor]
        guidance_scale: float | None = Field(None, ge=0.0, description="override the guider's scale for this call")
        guidance_batched: bool = Field(True, description="run the guidance passes as one batched forward")

    class Outputs(BlockIO):
        guidance: Guidance

    guider: AbstractGuider = component(description="the guidance rule (CFG, APG, PAG, ...)")

    def check(self, user_inputs: Mapping[str, Any]) -> None:
        if user_inputs.get("guidance_scale") is not None and "guidance_scale" not in type(self.guider).model_fields:
            raise FieldError("guidance_scale", f"{type(self.guider).__name__} has no guidance_scale to override")

    def __call__(self, inputs: Inputs) -> Outputs:
        guider = self.guider
        if inputs.guidance_scale is not None and inputs.guidance_scale != getattr(guider, "guidance_scale", None):
            guider = type(guider).model_validate({**guider.model_dump(), "guidance_scale": inputs.guidance_scale})
        conditions = GuidanceConditions({"cond": inputs.conditioning, "uncond": inputs.negative_conditioning})
        return self.Outputs(guidance=Guidance(guider, guider.new_state(), conditions, inputs.guidance_batched))
