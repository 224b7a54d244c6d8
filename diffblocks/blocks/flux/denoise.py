"""The flow prediction in Flux.1's denoising loop (the scheduler step is the standard one)."""

from __future__ import annotations

from torch import Tensor

from diffblocks.blocks.block import Block, BlockIO, component
from diffblocks.blocks.fields import produced
from diffblocks.blocks.standard.guidance import Guidance
from diffblocks.blocks.types import Float
from diffblocks.components.models.flux import FluxTransformer2DModel


class PredictFlow(Block):
    """Run the transformer for every pass the guider asks for and combine them into one guided flow prediction.

    The transformer takes ``t / 1000`` (a sigma in 0..1) and, for dev, the embedded guidance
    scale, both per sample, as diffusers' ``FluxPipeline`` passes them.
    """

    class Inputs(BlockIO):
        latents: Float["batch seq channels"]
        t: Tensor
        guidance: Guidance = produced(description="the guider and its passes for this run")
        embedded_guidance: Float["one"] | None = produced(description="dev's embedded guidance scale")
        image_ids: Float["seq 3"] = produced(description="the latent tokens' positions")
        text_ids: Float["seq 3"] = produced(description="the text tokens' positions")
        step_index: int
        num_steps: int

    class Outputs(BlockIO):
        noise_pred: Float["batch seq channels"]

    transformer: FluxTransformer2DModel = component(description="the denoiser")

    def __call__(self, inputs: Inputs) -> Outputs:
        transformer, embedded = self.transformer, inputs.embedded_guidance
        image_ids, text_ids = inputs.image_ids, inputs.text_ids
        # Once per step, not once per guidance pass; expanding the 0-d result to a batch is a view.
        sigma = inputs.t.to(inputs.latents.dtype) / 1000

        def predict(x: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor) -> Tensor:
            n = x.shape[0]
            return transformer(
                x,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=sigma.expand(n),
                img_ids=image_ids,
                txt_ids=text_ids,
                guidance=None if embedded is None else embedded.expand(n),
            )

        noise_pred = inputs.guidance.prediction(
            predict, latents=inputs.latents, step_index=inputs.step_index, num_steps=inputs.num_steps, model=transformer
        )
        return self.Outputs(noise_pred=noise_pred)
