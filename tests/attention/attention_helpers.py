"""Helpers for the attention seam's tests: random inputs, two marker backends and a counting one (registered on import)."""

from __future__ import annotations

from typing import ClassVar, final

import torch
from torch import Tensor

from diffblocks.components.attention import (
    ANY_DEVICE,
    AbstractAttentionBackend,
    DeviceSupport,
    register_attention_backend,
)
from diffblocks.components.attention.support import FLOAT_DTYPES


class AbstractMarkerBackend(AbstractAttentionBackend):
    """Returns a constant, so a test can tell which backend actually ran (even when compiled)."""

    marker: ClassVar[float]
    support = {ANY_DEVICE: DeviceSupport(dtypes=FLOAT_DTYPES)}

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float | None, is_causal: bool
    ) -> Tensor:
        return q.new_full((*q.shape[:-1], v.shape[-1]), self.marker)


@final
@register_attention_backend
class MarkerOne(AbstractMarkerBackend):
    name = "test_marker_one"
    marker = 1.0


@final
@register_attention_backend
class MarkerTwo(AbstractMarkerBackend):
    name = "test_marker_two"
    marker = 2.0


@final
@register_attention_backend
class CountingBackend(AbstractAttentionBackend):
    """Exact attention that counts its calls."""

    name = "test_counting"
    support = {ANY_DEVICE: DeviceSupport(dtypes=FLOAT_DTYPES)}
    calls: ClassVar[int] = 0

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float | None, is_causal: bool) -> Tensor:
        CountingBackend.calls += 1
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal)


def marker_of(out: Tensor) -> float:
    """Which marker backend produced ``out`` (1.0 or 2.0), or NaN when a real kernel ran."""
    first = float(out.flatten()[0].item())
    return first if first in (1.0, 2.0) and bool((out == first).all()) else float("nan")


def qkv(
    *, batch: int = 2, heads: int = 3, seq_q: int = 6, seq_k: int = 7, head_dim: int = 8, head_dim_v: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """Random ``(batch, heads, seq, head_dim)`` q, k and v."""
    q = torch.randn(batch, heads, seq_q, head_dim, dtype=dtype)
    k = torch.randn(batch, heads, seq_k, head_dim, dtype=dtype)
    v = torch.randn(batch, heads, seq_k, head_dim_v or head_dim, dtype=dtype)
    return q, k, v
