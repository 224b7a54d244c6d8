"""Guidance set-up, once per call: the guider with the call's overrides, its state, and the conditions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import Field
from torch import Tensor, nn

from diffblocks.blocks.block import Block, BlockIO, component, known
from diffblocks.blocks.errors import FieldError
from diffblocks.blocks.fields import produced
from diffblocks.blocks.types import Float
from diffblocks.components.denoisers import Conditioning, Predict
from diffblocks.components.guiders import AbstractGuider, GuidanceConditions, GuiderState, guided_prediction


def check_guider(guider: AbstractGuider, *, model: nn.Module | None, shape: Sequence[int | None]) -> None:
    """Check ``guider`` against the denoiser and its prediction shape before any step runs.

    Args:
        guider: the guider of this call (with its overrides).
        model: the denoiser perturbations hook into; None skips the layer check.
        shape: one pass's prediction shape, ``None`` where a size is not known yet.

    Raises:
        FieldError: on ``guider``, with the guider's own message (field, value and fix).
    """
    try:
        if model is not None:
            guider.check_model(model)
        guider.check_predictions(shape)
    except ValueError as err:
        raise FieldError("guider", str(err)) from err


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
            predict: the denoiser at this step (``denoiser.at(t)``), called as ``predict(x, conditioning)``.
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
    """Apply per-call overrides (``guidance_scale``) to the guider and pair the conditions for its passes.

    The guider is checked before the call runs: perturbed layers against ``unet`` and settings
    against 4-D predictions; settings that depend on the latent size (frequency-decoupled levels)
    against ``latents`` here, before the denoising loop. A per-call ``guidance_scale`` must be
    >= 0 (a guard against typos); a negative CFG scale is set on the guider itself.
    """

    class Inputs(BlockIO):
        conditioning: Conditioning = produced(description="the prompt's embeddings")
        negative_conditioning: Conditioning = produced(description="the negative prompt's embeddings")
        guidance_scale: float | None = Field(None, ge=0.0, description="override the guider's scale for this call")
        guidance_batched: bool = Field(True, description="run the guidance passes as one batched forward")
        latents: Float["batch channels height width"] | None = Field(
            None, description="the starting latents, to check latent-size settings of the guider"
        )

    class Outputs(BlockIO):
        guidance: Guidance

    guider: AbstractGuider = component(description="the guidance rule (CFG, APG, PAG, ...)")
    unet: nn.Module = component(optional=True, description="the denoiser; perturbed layers are checked against it")

    def check(self, inputs: Inputs) -> None:
        if known(inputs, "guidance_scale") is not None and "guidance_scale" not in type(self.guider).model_fields:
            raise FieldError("guidance_scale", f"{type(self.guider).__name__} has no guidance_scale to override")
        latents = known(inputs, "latents")  # usually made by an earlier block: then checked in __call__
        given = isinstance(latents, Tensor) and latents.ndim == 4
        check_guider(self.guider, model=self.unet, shape=tuple(latents.shape) if given else (None,) * 4)

    def __call__(self, inputs: Inputs) -> Outputs:
        guider = self.guider
        if inputs.latents is not None:
            check_guider(guider, model=None, shape=tuple(inputs.latents.shape))
        if inputs.guidance_scale is not None and inputs.guidance_scale != getattr(guider, "guidance_scale", None):
            guider = type(guider).model_validate({**guider.model_dump(), "guidance_scale": inputs.guidance_scale})
        conditions = GuidanceConditions({"cond": inputs.conditioning, "uncond": inputs.negative_conditioning})
        return self.Outputs(guidance=Guidance(guider, guider.new_state(), conditions, inputs.guidance_batched))
