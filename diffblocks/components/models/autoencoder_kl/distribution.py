"""The encoder's posterior: a Gaussian with diagonal covariance (Kingma & Welling 2014)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

import torch
from jaxtyping import Float
from torch import Tensor

from diffblocks.components.noise import Generator, randn_tensor


@final
@dataclass(frozen=True)
class DiagonalGaussian:
    """Per-element mean and log-variance of the latent posterior ``q(z | x)``.

    Args:
        mean: ``(batch, latent, h, w)``.
        logvar: same shape, clamped to [-30, 20] as trained.

    Example:
        >>> moments = torch.zeros(1, 8, 2, 2)
        >>> dist = DiagonalGaussian.from_moments(moments)
        >>> dist.mode().shape, float(dist.std.mean())
        (torch.Size([1, 4, 2, 2]), 1.0)
    """

    mean: Float[Tensor, "batch latent h w"]
    logvar: Float[Tensor, "batch latent h w"]

    @classmethod
    def from_moments(cls, moments: Float[Tensor, "batch moments h w"]) -> DiagonalGaussian:
        """Split the encoder output into mean and log-variance along the channels."""
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return cls(mean, torch.clamp(logvar, -30.0, 20.0))

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: Generator | None = None) -> Float[Tensor, "batch latent h w"]:
        """Draw ``mean + std * noise``; the same generator gives diffusers' sample."""
        noise = randn_tensor(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Float[Tensor, "batch latent h w"]:
        """The most likely latent (the mean)."""
        return self.mean


__all__ = ["DiagonalGaussian"]
