"""The flow prediction in Flux.1's denoising loop (the scheduler step is the standard one)."""

from __future__ import annotations

from torch import Tensor

from diffblocks.blocks.block import Block, BlockIO, component
from diffblocks.blocks.fields import produced
from diffblocks.blocks.standard.guidance import Guidance
from diffblocks.blocks.types import Float
from diffblocks.components.denoisers import FluxDenoiser
from diffblocks.components.models.flux import FluxTransformer2DModel
from diffblocks.components.models.ip_adapter import FluxIPAdapterModel, MultiFluxIPAdapterModel


class PredictFlow(Block):
    """Run the transformer for every pass the guider asks for and combine them into one guided flow prediction.

    The transformer runs through its denoiser wrapper (:meth:`denoiser`), which passes ``t / 1000``
    (a sigma in 0..1) and, for dev, the embedded guidance, both per sample, as diffusers'
    ``FluxPipeline`` passes them; the conditioning carries the token positions and the guidance.
    """

    class Inputs(BlockIO):
        latents: Float["batch seq channels"]
        t: Tensor
        guidance: Guidance = produced(description="the guider and its passes for this run")
        step_index: int
        num_steps: int

    class Outputs(BlockIO):
        noise_pred: Float["batch seq channels"]

    transformer: FluxTransformer2DModel = component(description="the denoiser")
    ip_adapter: FluxIPAdapterModel | MultiFluxIPAdapterModel = component(
        optional=True, description="reads the image prompt's tokens in the conditioning (docs/ip_adapter.md)"
    )

    def __call__(self, inputs: Inputs) -> Outputs:
        denoiser = self.denoiser()
        # the timestep in the latents' dtype, once per step and not once per guidance pass
        predict = denoiser.at(inputs.t.to(inputs.latents.dtype))
        noise_pred = inputs.guidance.prediction(
            predict, latents=inputs.latents, step_index=inputs.step_index, num_steps=inputs.num_steps, model=denoiser.model
        )
        return self.Outputs(noise_pred=noise_pred)

    def denoiser(self) -> FluxDenoiser:
        """The transformer as a denoiser, made at every step (it is a light wrapper, so a swapped transformer is seen at once)."""
        return FluxDenoiser(self.transformer, ip_adapter=self.ip_adapter)
