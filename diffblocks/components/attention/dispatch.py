"""Attention dispatch: one function, backends chosen behind it."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
) -> Tensor:
    """Scaled dot-product attention over ``(batch, heads, seq, head_dim)`` tensors.

    Args:
        q: queries, ``(batch, heads, seq_q, head_dim)``.
        k: keys, ``(batch, heads, seq_k, head_dim)``.
        v: values, ``(batch, heads, seq_k, head_dim_v)``.
        mask: optional boolean (True = attend) or additive float mask broadcastable to
            ``(batch, heads, seq_q, seq_k)``.
        scale: softmax scale; ``head_dim ** -0.5`` when None.
        is_causal: apply a causal mask.

    Returns:
        ``(batch, heads, seq_q, head_dim_v)``.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal)


__all__ = ["attention"]
