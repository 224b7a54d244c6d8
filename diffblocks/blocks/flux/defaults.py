"""Per-model defaults: Flux.1-dev and schnell share one preset, told apart by the transformer's config."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from diffblocks.blocks.block import Block, BlockIO, component, known
from diffblocks.blocks.errors import FieldError
from diffblocks.components.models.flux import FluxTransformer2DModel


@dataclass(frozen=True, slots=True)
class VariantDefaults:
    """What a Flux.1 variant runs with when the call does not say."""

    num_inference_steps: int
    max_sequence_length: int


# dev is guidance-distilled (28 steps, the full T5 context); schnell is timestep-distilled to a few
# steps and was trained with 256 T5 tokens (Black Forest Labs' model cards).
DEV = VariantDefaults(num_inference_steps=28, max_sequence_length=512)
SCHNELL = VariantDefaults(num_inference_steps=4, max_sequence_length=256)


def variant_defaults(transformer: FluxTransformer2DModel) -> VariantDefaults:
    """dev's defaults when the transformer embeds a guidance scale, else schnell's."""
    return DEV if transformer.params.guidance_embeds else SCHNELL


def resolve_steps(steps: int | None, sigmas: list[float] | None, transformer: FluxTransformer2DModel) -> int:
    """The call's step count: as given, else one per custom sigma, else the variant's default."""
    if steps is not None:
        return steps
    return len(sigmas) if sigmas is not None else variant_defaults(transformer).num_inference_steps


class FluxDefaults(Block):
    """Fill in the defaults that differ between dev and schnell, read from ``transformer.params.guidance_embeds``.

    dev: 28 steps, 512 T5 tokens; schnell: 4 steps, 256 T5 tokens. With custom ``sigmas`` the step
    count is their number.
    """

    class Inputs(BlockIO):
        num_inference_steps: int | None = Field(
            None, ge=1, le=1000, description="denoising steps (default: 28 for dev, 4 for schnell)"
        )
        max_sequence_length: int | None = Field(
            None, ge=1, le=512, description="T5 tokens per prompt (default: 512 for dev, 256 for schnell)"
        )
        sigmas: list[float] | None = Field(None, description="custom noise levels from 1 down, before the shift")

    class Outputs(BlockIO):
        num_inference_steps: int
        max_sequence_length: int

    transformer: FluxTransformer2DModel = component(description="the denoiser; its config tells dev from schnell")

    def check(self, inputs: Inputs) -> None:
        steps, sigmas = known(inputs, "num_inference_steps"), known(inputs, "sigmas")
        if sigmas is not None:
            if not sigmas:
                raise FieldError("sigmas", "sigmas is an empty list; give one noise level per step")
            if steps is not None and steps != len(sigmas):
                raise FieldError(
                    "sigmas", f"{len(sigmas)} sigmas for num_inference_steps {steps}; give one per step (or leave the steps out)"
                )

    def __call__(self, inputs: Inputs) -> Outputs:
        steps = resolve_steps(inputs.num_inference_steps, inputs.sigmas, self.transformer)
        length = inputs.max_sequence_length
        if length is None:
            length = variant_defaults(self.transformer).max_sequence_length
        return self.Outputs(num_inference_steps=steps, max_sequence_length=length)
