"""Sinusoidal timestep features and the MLP that embeds them (Vaswani et al. 2017; Ho et al. 2020)."""

from __future__ import annotations

import math
from typing import final

import torch
from jaxtyping import Float
from torch import Tensor, nn


def timestep_features(
    timesteps: Float[Tensor, " n"],
    dim: int,
    *,
    flip_sin_to_cos: bool,
    freq_shift: float,
    max_period: float = 10000.0,
) -> Float[Tensor, "n dim"]:
    """Sinusoidal features of ``timesteps`` in float32, laid out as diffusers' ``get_timestep_embedding``.

    Args:
        timesteps: one value per batch item (may be fractional).
        dim: feature width; an odd width is zero-padded by one.
        flip_sin_to_cos: put the cosines first (SD convention).
        freq_shift: subtracted from the half-width in the frequency exponent.
        max_period: the lowest frequency is ``1 / max_period``.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    angles = timesteps[:, None].float() * torch.exp(exponent / (half - freq_shift))[None, :]
    sin, cos = torch.sin(angles), torch.cos(angles)
    features = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return nn.functional.pad(features, (0, dim % 2))


@final
class Timesteps(nn.Module):
    """Parameter-free sinusoidal features; see :func:`timestep_features`."""

    def __init__(self, dim: int, *, flip_sin_to_cos: bool, freq_shift: float) -> None:
        super().__init__()
        self.dim = dim
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift

    def forward(self, timesteps: Float[Tensor, " n"]) -> Float[Tensor, "n dim"]:
        return timestep_features(timesteps, self.dim, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)


@final
class TimestepEmbedding(nn.Module):
    """Two-layer SiLU MLP from features to the embedding every resnet block receives.

    Args:
        in_dim: feature width.
        dim: embedding width.
    """

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Float[Tensor, "batch in_dim"]) -> Float[Tensor, "batch dim"]:
        return self.linear_2(self.act(self.linear_1(x)))


__all__ = ["TimestepEmbedding", "Timesteps", "timestep_features"]
