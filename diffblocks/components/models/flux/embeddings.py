"""Conditioning embedders of Flux.1: timestep, guidance and pooled text, and RoPE over position ids."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

_FREQ_CHANNELS = 256  # width of the sinusoidal timestep features, fixed across Flux.1 checkpoints
_NO_FLOAT64 = frozenset({"mps", "npu", "neuron"})


def timestep_embedding(t: Float[Tensor, " batch"], dim: int, *, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of a (fractional) timestep, cosines first (Vaswani et al. 2017; DDPM).

    Args:
        t: one scalar per sample, in the model's 0..1000 scale.
        dim: number of features (even).

    Returns:
        ``(batch, dim)`` float32 features ``[cos(t f_i), sin(t f_i)]`` with ``f_i = max_period^(-i/half)``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t[:, None].float() * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear, used for every conditioning vector of Flux.1."""

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_dim)
        self.linear_2 = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Float[Tensor, "batch in_dim"]) -> Float[Tensor, "batch hidden_dim"]:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbedding(nn.Module):
    """Sum of timestep, optional guidance and pooled-text embeddings: the vector that modulates every block.

    Args:
        inner_dim: width of the residual stream.
        pooled_projection_dim: channels of the pooled CLIP embedding.
        guidance_embeds: build the guidance embedder (guidance-distilled Flux.1-dev).
    """

    def __init__(self, inner_dim: int, *, pooled_projection_dim: int, guidance_embeds: bool) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(_FREQ_CHANNELS, inner_dim)
        self.guidance_embedder = MLPEmbedder(_FREQ_CHANNELS, inner_dim) if guidance_embeds else None
        self.text_embedder = MLPEmbedder(pooled_projection_dim, inner_dim)

    def forward(
        self,
        timestep: Float[Tensor, " batch"],
        pooled_projections: Float[Tensor, "batch pooled_dim"],
        *,
        guidance: Float[Tensor, " batch"] | None = None,
    ) -> Float[Tensor, "batch inner_dim"]:
        dtype = pooled_projections.dtype
        temb = self.timestep_embedder(timestep_embedding(timestep, _FREQ_CHANNELS).to(dtype))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this Flux model embeds a guidance scale (guidance_embeds=True): pass guidance")
            temb = temb + self.guidance_embedder(timestep_embedding(guidance, _FREQ_CHANNELS).to(dtype))
        elif guidance is not None:
            raise ValueError("this Flux model has no guidance embedder (guidance_embeds=False): pass guidance=None")
        return temb + self.text_embedder(pooled_projections)


class RotaryEmbedding(nn.Module):
    """Multi-axis RoPE (Su et al. 2021): each id axis rotates its own slice of every head's channels.

    Flux ids are ``(seq, 3)``: axis 0 is unused by text-to-image (all zeros), axes 1 and 2 are the
    latent row and column; text tokens sit at position 0 on every axis.

    Args:
        axes_dims: channels per axis, summing to the head dim.
        theta: base of the frequency ladder.
    """

    def __init__(self, axes_dims: tuple[int, ...], *, theta: float = 10_000.0) -> None:
        super().__init__()
        self.axes_dims = axes_dims
        self.theta = theta

    def forward(self, ids: Float[Tensor, "seq axes"]) -> tuple[Tensor, Tensor]:
        """Return ``(cos, sin)``, each ``(seq, head_dim)`` float32, every angle repeated for its channel pair."""
        # float64 angles keep large positions accurate, where the device has float64.
        freq_dtype = torch.float32 if ids.device.type in _NO_FLOAT64 else torch.float64
        pos = ids.float()
        cos, sin = [], []
        for axis, dim in enumerate(self.axes_dims):
            exponents = torch.arange(0, dim, 2, dtype=freq_dtype, device=ids.device) / dim
            angles = torch.outer(pos[:, axis], 1.0 / self.theta**exponents)  # (seq, dim/2)
            cos.append(angles.cos().repeat_interleave(2, dim=1).float())
            sin.append(angles.sin().repeat_interleave(2, dim=1).float())
        return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def apply_rope(
    x: Float[Tensor, "batch seq heads head_dim"], rope: tuple[Tensor, Tensor]
) -> Float[Tensor, "batch seq heads head_dim"]:
    """Rotate each adjacent channel pair ``(x0, x1)`` of ``x`` by its position's angle, in float32.

    Args:
        x: queries or keys, sequence before heads (the layout the projections produce).
        rope: ``(cos, sin)`` from :class:`RotaryEmbedding`, each ``(seq, head_dim)``.
    """
    cos, sin = (t[:, None, :] for t in rope)  # broadcast over heads
    pairs = x.unflatten(-1, (-1, 2))
    # (x0, x1) -> (-x1, x0) is the 90-degree turn; cos/sin already repeat per pair.
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos + turned.float() * sin).to(x.dtype)
