"""PyTorch flex attention, with the seam's dense masks expressed as score modifications."""

from __future__ import annotations

from collections.abc import Callable
from typing import final

import torch
from torch import Tensor
from torch.compiler import is_dynamo_compiling

from diffblocks.components.attention.base import AbstractAttentionBackend
from diffblocks.components.attention.registry import AttentionBackendName, register_attention_backend
from diffblocks.components.attention.support import HALF_DTYPES, DeviceSupport

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
FlexKernel = Callable[..., Tensor]

# Device types where inductor emits flex's fused kernel. Elsewhere (CPU) we run flex's unfused
# reference path, traced with the "eager" compile backend: inductor's CPU template costs tens
# of seconds per shape to build, which is no use for a backend that is only there for parity.
_FUSED_DEVICES = frozenset({"cuda", "xpu"})


def _score_mod(q: Tensor, k: Tensor, mask: Tensor | None, is_causal: bool) -> ScoreMod | None:
    """A score_mod applying ``mask`` (boolean or additive) or the top-left causal mask."""
    if mask is not None:
        full = mask.expand(q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
        if full.dtype == torch.bool:

            def masked(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                return torch.where(full[b, h, q_idx, kv_idx], score, float("-inf"))

            return masked

        def biased(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return score + full[b, h, q_idx, kv_idx]

        return biased
    if is_causal:

        def causal(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return torch.where(q_idx >= kv_idx, score, float("-inf"))

        return causal
    return None


@final
@register_attention_backend
class FlexAttentionBackend(AbstractAttentionBackend):
    """``torch.nn.attention.flex_attention`` (Dong et al., 2024, "Flex Attention").

    Outside ``torch.compile`` the call goes through a cached ``torch.compile(flex_attention)``
    (fused on CUDA); inside a compiled region flex is traced in place. Masks are dense here,
    so no block sparsity is exploited.
    """

    name = AttentionBackendName.FLEX.value
    support = {
        "cuda": DeviceSupport(dtypes=HALF_DTYPES | {torch.float32}, min_cuda_capability=(8, 0)),
        "cpu": DeviceSupport(dtypes=HALF_DTYPES | {torch.float32}),
    }

    def __init__(self) -> None:
        self._kernels: dict[str, FlexKernel] = {}

    def _kernel(self, device_type: str) -> FlexKernel:
        kernel = self._kernels.get(device_type)
        if kernel is None:
            from torch.nn.attention.flex_attention import flex_attention

            backend = "inductor" if device_type in _FUSED_DEVICES else "eager"
            kernel = self._kernels[device_type] = torch.compile(flex_attention, backend=backend)
        return kernel

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float | None, is_causal: bool
    ) -> Tensor:
        score_mod = _score_mod(q, k, mask, is_causal)
        if is_dynamo_compiling():
            from torch.nn.attention.flex_attention import flex_attention

            kernel: FlexKernel = flex_attention
        else:
            kernel = self._kernel(q.device.type)
        return kernel(q, k, v, score_mod=score_mod, scale=scale)


__all__ = ["FlexAttentionBackend"]
