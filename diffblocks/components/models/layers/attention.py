"""Multi-head attention layers with diffusers' parameter names, all going through the attention seam."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import final

from jaxtyping import Float
from torch import Tensor, nn

from diffblocks.components.attention import attention
from diffblocks.components.models.layers.norm import GroupNorm


ExtraKeysValues = tuple[Tensor, Tensor, float]
"""``(keys, values, scale)``: ``(batch, seq_k, heads * dim)`` projections a cross-attention layer also attends to."""

CrossAttentionExtras = Mapping[nn.Module, Sequence[ExtraKeysValues]]
"""The extra keys and values of each cross-attention layer (an :class:`Attention`) that has some, by the layer."""


def multihead(q: Tensor, k: Tensor, v: Tensor, *, heads: int, mask: Tensor | None = None) -> Tensor:
    """Split ``(batch, seq, heads * dim)`` projections into heads, attend, and merge the heads back."""
    # (b, s, h*d) -> (b, h, s, d) views and back with plain tensor methods: this runs in every
    # attention layer at every step, where einops' per-call pattern handling costs more than the
    # reshapes themselves.
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    return attention(q, k, v, mask=mask).transpose(1, 2).flatten(2)


@final
class Attention(nn.Module):
    """Scaled dot-product multi-head attention (Vaswani et al. 2017), self or cross.

    Args:
        query_dim: channels of the queries (and of the output).
        heads: number of heads.
        head_dim: channels per head.
        context_dim: channels of the keys/values source for cross-attention; None for self-attention.
        bias: bias on the q/k/v projections.
        dropout: dropout after the output projection.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.is_cross_attention = context_dim is not None
        self.key_dims = (context_dim or query_dim, inner)  # (source width, key width): what extra keys must match
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def forward(
        self,
        x: Float[Tensor, "batch seq dim"],
        context: Float[Tensor, "batch seq_k ctx_dim"] | None = None,
        *,
        mask: Tensor | None = None,
        extra: Sequence[ExtraKeysValues] = (),
    ) -> Float[Tensor, "batch seq dim"]:
        """Attend from ``x`` to ``context`` (``x`` itself when None); ``mask`` is an additive bias
        or boolean keep-mask broadcastable to ``(batch, heads, seq, seq_k)``.

        ``extra`` are further keys and values the same queries attend to, each result added at its
        scale before the output projection: IP-Adapter's decoupled cross-attention to image tokens
        (Ye et al. 2023, eq. 5), whose keys and values its own projections made.
        """
        source = x if context is None else context
        q = self.to_q(x)
        out = multihead(q, self.to_k(source), self.to_v(source), heads=self.heads, mask=mask)
        for keys, values, scale in extra:
            out = out + scale * multihead(q, keys, values, heads=self.heads)
        for layer in self.to_out:
            out = layer(out)
        return out


@final
class SpatialSelfAttention(nn.Module):
    """Single-block self-attention over the pixels of a feature map, with GroupNorm and a residual.

    The VAE's mid-block attention (Rombach et al. 2022, latent diffusion); parameter names match
    diffusers' ``Attention`` built with ``norm_num_groups`` and ``residual_connection=True``.

    Args:
        channels: feature-map channels.
        head_dim: channels per head (the VAE uses one head of all channels).
        groups: GroupNorm groups.
        eps: GroupNorm epsilon.
    """

    def __init__(self, channels: int, *, head_dim: int, groups: int, eps: float = 1e-6) -> None:
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"head_dim {head_dim} does not divide channels {channels}")
        self.heads = channels // head_dim
        self.group_norm = GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: Float[Tensor, "batch c height width"]) -> Float[Tensor, "batch c height width"]:
        height = x.shape[-2]
        # Normalise the flattened (b, c, pixels) view, as diffusers does: GroupNorm's rounding depends
        # on the memory layout, and the encoder's outputs are channels-last.
        h = self.group_norm(x.flatten(2)).transpose(1, 2)
        h = multihead(self.to_q(h), self.to_k(h), self.to_v(h), heads=self.heads)
        for layer in self.to_out:
            h = layer(h)
        # A transposed view (not a contiguous copy) as the sum's first operand: the result then takes
        # diffusers' channels-last memory layout, on which the following convolutions' rounding depends.
        return h.transpose(1, 2).unflatten(2, (height, -1)) + x


__all__ = ["Attention", "CrossAttentionExtras", "ExtraKeysValues", "SpatialSelfAttention", "multihead"]
