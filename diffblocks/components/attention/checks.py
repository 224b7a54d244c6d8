"""Checks mode: validate attention inputs before every call, reporting every problem at once."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import final

import torch
from torch import Tensor

from diffblocks.components.attention.base import AbstractAttentionBackend
from diffblocks.components.attention.errors import AttentionInputError, UnsupportedAttentionError

_LAYOUT = "(batch, heads, seq, head_dim)"
MASK_WITH_CAUSAL = "pass either mask or is_causal=True, not both (fold the causal mask into mask)"


def _describe(values: Mapping[str, object]) -> str:
    return ", ".join(f"{name} {value}" for name, value in values.items())


def attention_input_errors(
    q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float | None, is_causal: bool
) -> list[str]:
    """Every inconsistency between q, k, v and mask; empty when the call is well formed."""
    errors = [
        f"{name} must be 4-D {_LAYOUT}, got shape {tuple(t.shape)}"
        for name, t in (("q", q), ("k", k), ("v", v))
        if t.ndim != 4
    ]
    if errors:
        return errors
    devices = {"q": q.device, "k": k.device, "v": v.device}
    if len(set(devices.values())) > 1:
        errors.append(f"q, k and v must be on one device, got {_describe(devices)}")
    dtypes = {"q": q.dtype, "k": k.dtype, "v": v.dtype}
    if len(set(dtypes.values())) > 1:
        errors.append(f"q, k and v must share one dtype, got {_describe(dtypes)}")
    if not q.dtype.is_floating_point:
        errors.append(f"q, k and v must be floating point, got {q.dtype}")
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    if not batch == k.shape[0] == v.shape[0]:
        errors.append(f"batch sizes differ: q {batch}, k {k.shape[0]}, v {v.shape[0]}")
    if not heads == k.shape[1] == v.shape[1]:
        errors.append(
            f"head counts differ: q {heads}, k {k.shape[1]}, v {v.shape[1]} "
            "(grouped-query attention is not supported: repeat k and v along heads first)"
        )
    if k.shape[3] != head_dim:
        errors.append(f"q head_dim {head_dim} must equal k head_dim {k.shape[3]}")
    if v.shape[2] != seq_k:
        errors.append(f"k and v sequence lengths differ: k {seq_k}, v {v.shape[2]}")
    if scale is not None and not math.isfinite(scale):
        errors.append(f"scale must be a finite number, got {scale}")
    if mask is not None:
        errors.extend(_mask_errors(mask, q, (batch, heads, seq_q, seq_k), is_causal=is_causal))
    return errors


def _mask_errors(mask: Tensor, q: Tensor, target: tuple[int, int, int, int], *, is_causal: bool) -> list[str]:
    errors: list[str] = []
    if mask.device != q.device:
        errors.append(f"mask is on {mask.device} but q is on {q.device}")
    if mask.dtype != torch.bool and mask.dtype != q.dtype:
        errors.append(f"mask must be bool (True = attend) or q's dtype {q.dtype} (additive), got {mask.dtype}")
    # broadcastable *to* target: right-aligned, every mask dim is 1 or the target's
    shape = tuple(mask.shape)
    fits = len(shape) <= len(target) and all(m in (1, t) for m, t in zip(reversed(shape), reversed(target)))
    if not fits:
        errors.append(
            f"mask shape {tuple(mask.shape)} does not broadcast to (batch, heads, seq_q, seq_k) = {target}"
        )
    if is_causal:
        errors.append(MASK_WITH_CAUSAL)
    return errors


@final
class CheckedAttentionBackend:
    """Wraps a backend so each call is validated (inputs, then declared support) before it runs."""

    def __init__(self, backend: AbstractAttentionBackend) -> None:
        self.backend = backend

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float | None, is_causal: bool
    ) -> Tensor:
        """Validate, then run the wrapped backend; raises with every problem found."""
        errors = attention_input_errors(q, k, v, mask=mask, scale=scale, is_causal=is_causal)
        if errors:
            raise AttentionInputError(backend=self.backend.name, reasons=errors)
        reasons = self.backend.unsupported_reasons(q, k, v, mask=mask, is_causal=is_causal)
        if reasons:
            raise UnsupportedAttentionError(backend=self.backend.name, reasons=reasons)
        return self.backend.forward(q, k, v, mask=mask, scale=scale, is_causal=is_causal)

    def __repr__(self) -> str:
        return f"<checked {self.backend!r}>"


__all__ = ["CheckedAttentionBackend", "attention_input_errors"]
