"""Sinusoidal timestep features and the MLP that embeds them (Vaswani et al. 2017; Ho et al. 2020).

The UNet and its ControlNets embed the timestep, and SDXL's pooled text and size ids, the same
way and under the same module names: :func:`time_embeddings` builds the modules for a UNet
architecture, and :func:`text_time_embedding` runs SDXL's pair (Podell et al. 2023, section 2.2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple, final

import torch
from jaxtyping import Float
from torch import Tensor, nn

from diffblocks.components.models.unet.params import UNet2DConditionParams

_MSG_TEXT_TIME = (
    "this {model} uses SDXL's text-time conditioning: pass added_cond_kwargs={{'text_embeds': the pooled "
    "text embedding (batch, dim), 'time_ids': (batch, 6) = original size, crop top-left, target size}}; "
    "got {got}."
)


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


class TimeEmbeddings(NamedTuple):
    """The modules that embed a UNet's timestep, and SDXL's text-time pair (None unless ``"text_time"``)."""

    time_proj: Timesteps
    time_embedding: TimestepEmbedding
    add_time_proj: Timesteps | None
    add_embedding: TimestepEmbedding | None


def time_embeddings(p: UNet2DConditionParams) -> TimeEmbeddings:
    """The time embeddings of a UNet of architecture ``p`` (a ControlNet of it builds the same ones).

    They are made in this order, as the models always made them, so a seeded model starts from the same weights.
    """
    width = p.block_out_channels[0]
    time_proj = Timesteps(width, flip_sin_to_cos=p.flip_sin_to_cos, freq_shift=p.freq_shift)
    time_embedding = TimestepEmbedding(width, p.time_embed_dim)
    if p.addition_embed_type != "text_time":
        return TimeEmbeddings(time_proj, time_embedding, None, None)
    assert p.addition_time_embed_dim is not None and p.projection_class_embeddings_input_dim is not None
    add_time_proj = Timesteps(p.addition_time_embed_dim, flip_sin_to_cos=p.flip_sin_to_cos, freq_shift=p.freq_shift)
    add_embedding = TimestepEmbedding(p.projection_class_embeddings_input_dim, p.time_embed_dim)
    return TimeEmbeddings(time_proj, time_embedding, add_time_proj, add_embedding)


def batch_timesteps(timestep: Tensor | float | int, sample: Tensor) -> Tensor:
    """One timestep per batch item, on the sample's device."""
    if not isinstance(timestep, Tensor):
        timestep = torch.tensor([timestep], device=sample.device)
    elif timestep.ndim == 0:
        timestep = timestep[None].to(sample.device)
    return timestep.expand(sample.shape[0])


def text_time_embedding(
    proj: Timesteps, embedding: TimestepEmbedding, added: Mapping[str, Tensor] | None, *, dtype: torch.dtype, model: str
) -> Tensor:
    """SDXL micro-conditioning: pooled text embedding + sinusoidal features of the six size ids.

    Args:
        proj: the size ids' sinusoidal features (``add_time_proj``).
        embedding: the MLP over the text embedding and those features (``add_embedding``).
        added: the call's ``added_cond_kwargs``: ``text_embeds`` (batch, pooled) and ``time_ids`` (batch, 6).
        dtype: the dtype of the embedding it is added to.
        model: what the error messages call the model (``"UNet"``, ``"ControlNet"``).

    Raises:
        ValueError: ``added`` lacks a key, or its widths do not add up to the MLP's input width.
    """
    pooled = embedding.linear_1.in_features
    if added is None or "text_embeds" not in added or "time_ids" not in added:
        raise ValueError(_MSG_TEXT_TIME.format(model=model, got="None" if added is None else sorted(added)))
    text, time_ids = added["text_embeds"], added["time_ids"]
    time_feats = proj(time_ids.flatten()).reshape(text.shape[0], -1)
    features = torch.cat([text, time_feats], dim=-1)
    if features.shape[-1] != pooled:
        raise ValueError(
            f"text_embeds {tuple(text.shape)} and time_ids {tuple(time_ids.shape)} give "
            f"{features.shape[-1]} features but projection_class_embeddings_input_dim is {pooled}."
        )
    return embedding(features.to(dtype))


__all__ = [
    "TimeEmbeddings",
    "TimestepEmbedding",
    "Timesteps",
    "batch_timesteps",
    "text_time_embedding",
    "time_embeddings",
    "timestep_features",
]
