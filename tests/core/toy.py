"""Small blocks for testing the core without models."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from diffblocks.blocks import Block, BlockConfig, BlockIO, FieldError, Float, Shaped, component, known


class Denoiser(torch.nn.Module):
    """A stand-in model: predicts a fixed fraction of its input."""

    def __init__(self, gain: float = 0.1) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(gain))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x * self.gain * (1 + t / 1000)


class Decoder(torch.nn.Module):
    scale_factor = 8

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)


class SetTimesteps(Block):
    """Make a descending timestep schedule."""

    class Inputs(BlockIO):
        num_inference_steps: int = Field(4, ge=1, description="denoising steps")

    class Outputs(BlockIO):
        timesteps: Shaped["steps"]

    def __call__(self, inputs: Inputs) -> Outputs:
        return self.Outputs(timesteps=torch.linspace(999, 0, inputs.num_inference_steps))


class PrepareLatents(Block):
    """Seeded latents of the requested size."""

    class Inputs(BlockIO):
        height: int = Field(16, gt=0)
        width: int = Field(16, gt=0)
        batch_size: int = Field(1, ge=1)
        generator: torch.Generator | None = None

    class Outputs(BlockIO):
        latents: Float["batch channels height width"]

    class Config(BlockConfig):
        channels: int = 4

    decoder: Decoder = component(description="used for its scale factor")

    def check(self, inputs: Inputs) -> None:
        factor = self.decoder.scale_factor
        for name in ("height", "width"):
            value = known(inputs, name)
            if value is not None and value % factor:
                raise FieldError(name, f"{name} {value} must be divisible by {factor}")

    def __call__(self, inputs: Inputs) -> Outputs:
        f = self.decoder.scale_factor
        shape = (inputs.batch_size, self.config.channels, inputs.height // f, inputs.width // f)
        return self.Outputs(latents=torch.randn(shape, generator=inputs.generator))


class EncodeImage(Block):
    """Use an image as the starting latents (img2img stand-in)."""

    class Inputs(BlockIO):
        image: Float["batch channels height width"]
        strength: float = Field(0.5, ge=0.0, le=1.0)

    class Outputs(BlockIO):
        latents: Float["batch channels height width"]

    def __call__(self, inputs: Inputs) -> Outputs:
        return self.Outputs(latents=inputs.image[:, :4, ::8, ::8] * inputs.strength)


class Predict(Block):
    """Call the denoiser."""

    class Inputs(BlockIO):
        latents: Float["batch channels height width"]
        t: Any

    class Outputs(BlockIO):
        noise_pred: Float["batch channels height width"]

    denoiser: Denoiser = component()

    def __call__(self, inputs: Inputs) -> Outputs:
        return self.Outputs(noise_pred=self.denoiser(inputs.latents, inputs.t))


class Update(Block):
    """x <- x - pred."""

    class Inputs(BlockIO):
        latents: Float["batch channels height width"]
        noise_pred: Float["batch channels height width"]

    class Outputs(BlockIO):
        latents: Float["batch channels height width"]

    def __call__(self, inputs: Inputs) -> Outputs:
        return self.Outputs(latents=inputs.latents - inputs.noise_pred)


class Decode(Block):
    """Latents to images."""

    class Inputs(BlockIO):
        latents: Float["batch channels height width"]

    class Outputs(BlockIO):
        images: Float["batch channels height width"]

    decoder: Decoder = component()

    def __call__(self, inputs: Inputs) -> Outputs:
        return self.Outputs(images=self.decoder(inputs.latents))


def reference_run(denoiser: Denoiser, decoder: Decoder, *, steps: int, seed: int, size: int = 16) -> torch.Tensor:
    """The same computation, hand-written."""
    timesteps = torch.linspace(999, 0, steps)
    latents = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator().manual_seed(seed))
    for t in timesteps:
        latents = latents - denoiser(latents, t)
    return decoder(latents)
