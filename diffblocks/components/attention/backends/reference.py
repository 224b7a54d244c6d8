"""Plain softmax(q kᵀ · scale + mask) v in our own code: the yardstick for every other backend."""

from __future__ import annotations

from typing import final

import torch
from torch import Tensor

from diffblocks.components.attention.base import AbstractAttentionBackend
from diffblocks.components.attention.registry import AttentionBackendName, register_attention_backend
from diffblocks.components.attention.support import ANY_DEVICE, FLOAT_DTYPES, DeviceSupport


@final
@register_attention_backend
class ReferenceBackend(AbstractAttentionBackend):
    """Scaled dot-product attention written out (Vaswani et al., 2017, eq. 1), computed in float32+.

    Half-precision inputs are upcast so the result is a trustworthy reference, then cast back.
    Query rows whose keys are all masked produce zeros, as PyTorch's SDPA kernels do.
    """

    name = AttentionBackendName.REFERENCE.value
    support = {ANY_DEVICE: DeviceSupport(dtypes=FLOAT_DTYPES)}

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float | None, is_causal: bool
    ) -> Tensor:
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        factor = q.shape[-1] ** -0.5 if scale is None else scale
        scores = torch.matmul(q.to(compute), k.to(compute).transpose(-2, -1)) * factor
        if is_causal:
            seq_q, seq_k = q.shape[-2], k.shape[-2]
            # top-left aligned: query i sees keys 0..i, as in F.scaled_dot_product_attention
            visible = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~visible, float("-inf"))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(compute)
        weights = torch.softmax(scores, dim=-1)
        # softmax over a row of -inf is NaN; such rows attend to nothing and yield zeros
        weights = torch.where(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0, weights)
        return torch.matmul(weights, v.to(compute)).to(q.dtype)


__all__ = ["ReferenceBackend"]
