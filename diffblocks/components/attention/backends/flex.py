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

FlexCall = Callable[[Tensor, Tensor, Tensor, "Tensor | None", "float | None"], Tensor]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

# Device types where inductor emits flex's fused kernel. Elsewhere (CPU) we run flex's unfused
# reference path, traced with the "eager" compile backend: inductor's CPU template costs tens
# of seconds per shape to build, which is no use for a backend that is only there for parity.
_FUSED_DEVICES = frozenset({"cuda", "xpu"})


def _flex(q: Tensor, k: Tensor, v: Tensor, score_mod: ScoreMod | None, scale: float | None) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    out = flex_attention(q, k, v, score_mod=score_mod, scale=scale)
    assert isinstance(out, Tensor)
    return out


# One function per mask kind, each its own code object and so its own compile cache: one cache
# shared by all kinds would reach dynamo's recompile limit and drop to flex's unfused path.
# The mask is an argument, not a closure cell, so a new mask tensor never forces a recompile.
def _plain(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    return _flex(q, k, v, None, scale)


def _causal(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    def top_left(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return torch.where(q_idx >= kv_idx, score, float("-inf"))

    return _flex(q, k, v, top_left, scale)


def _bool_mask(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    assert mask is not None

    def keep(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return torch.where(mask[b, h, q_idx, kv_idx], score, float("-inf"))

    return _flex(q, k, v, keep, scale)


def _additive_mask(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    assert mask is not None

    def bias(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + mask[b, h, q_idx, kv_idx]

    return _flex(q, k, v, bias, scale)


@final
@register_attention_backend
class FlexAttentionBackend(AbstractAttentionBackend):
    """``torch.nn.attention.flex_attention`` (Dong et al., 2024, "Flex Attention").

    Outside ``torch.compile`` each mask kind goes through its own cached ``torch.compile``
    (fused on CUDA); inside a compiled region flex is traced in place. Masks are dense here,
    so no block sparsity is exploited.
    """

    name = AttentionBackendName.FLEX.value
    support = {
        "cuda": DeviceSupport(dtypes=HALF_DTYPES | {torch.float32}, min_cuda_capability=(8, 0)),
        "cpu": DeviceSupport(dtypes=HALF_DTYPES | {torch.float32}),
    }

    def __init__(self) -> None:
        self._compiled: dict[tuple[str, FlexCall], FlexCall] = {}

    def _compiled_call(self, device_type: str, call: FlexCall) -> FlexCall:
        compiled = self._compiled.get((device_type, call))
        if compiled is None:
            backend = "inductor" if device_type in _FUSED_DEVICES else "eager"
            compiled = self._compiled[(device_type, call)] = torch.compile(call, backend=backend)
        return compiled

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float | None, is_causal: bool
    ) -> Tensor:
        if mask is not None:
            mask = mask.expand(q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
            call: FlexCall = _bool_mask if mask.dtype == torch.bool else _additive_mask
        else:
            call = _causal if is_causal else _plain
        if not is_dynamo_compiling():
            call = self._compiled_call(q.device.type, call)
        return call(q, k, v, mask, scale)


__all__ = ["FlexAttentionBackend"]
