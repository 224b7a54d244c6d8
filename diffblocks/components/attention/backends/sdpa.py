"""PyTorch scaled_dot_product_attention: automatic kernel choice, or one kernel forced."""

from __future__ import annotations

from typing import ClassVar, final

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffblocks.components.attention.base import AbstractAttentionBackend
from diffblocks.components.attention.registry import AttentionBackendName, register_attention_backend
from diffblocks.components.attention.support import (
    ANY_DEVICE,
    FLOAT_DTYPES,
    HALF_DTYPES,
    BackendSupport,
    CausalSupport,
    DeviceSupport,
)

_EVERYTHING: BackendSupport = {ANY_DEVICE: DeviceSupport(dtypes=FLOAT_DTYPES)}


@final
@register_attention_backend
class SdpaBackend(AbstractAttentionBackend):
    """``F.scaled_dot_product_attention`` letting PyTorch pick the kernel (the default backend)."""

    name = AttentionBackendName.SDPA.value
    support = _EVERYTHING

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float | None, is_causal: bool
    ) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal)


class AbstractForcedSdpaBackend(AbstractAttentionBackend):
    """SDPA restricted to one kernel via ``torch.nn.attention.sdpa_kernel``; fails instead of falling back."""

    kernel: ClassVar[SDPBackend]

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float | None, is_causal: bool
    ) -> Tensor:
        with sdpa_kernel(self.kernel):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal)


@final
@register_attention_backend
class SdpaMathBackend(AbstractForcedSdpaBackend):
    """SDPA's unfused math kernel: runs everywhere, materialises the score matrix."""

    name = AttentionBackendName.SDPA_MATH.value
    kernel = SDPBackend.MATH
    support = _EVERYTHING


@final
@register_attention_backend
class SdpaFlashBackend(AbstractForcedSdpaBackend):
    """SDPA's FlashAttention-2 kernel (CUDA) or its fused CPU kernel (Dao, 2023)."""

    name = AttentionBackendName.SDPA_FLASH.value
    kernel = SDPBackend.FLASH_ATTENTION
    support = {
        "cpu": DeviceSupport(dtypes=FLOAT_DTYPES, distinct_value_head_dim=False, unit_head_stride=True),
        "cuda": DeviceSupport(
            dtypes=HALF_DTYPES,
            unit_head_stride=True,
            bool_mask=False,
            additive_mask=False,
            causal=CausalSupport.EQUAL_LENGTHS,
            max_head_dim=256,
            distinct_value_head_dim=False,
            min_cuda_capability=(8, 0),
        ),
    }


@final
@register_attention_backend
class SdpaEfficientBackend(AbstractForcedSdpaBackend):
    """SDPA's memory-efficient kernel (Rabe & Staats, 2021; xFormers' CUTLASS kernel)."""

    name = AttentionBackendName.SDPA_EFFICIENT.value
    kernel = SDPBackend.EFFICIENT_ATTENTION
    support = {
        "cuda": DeviceSupport(dtypes=HALF_DTYPES | {torch.float32}, min_cuda_capability=(5, 0), unit_head_stride=True),
    }


@final
@register_attention_backend
class SdpaCudnnBackend(AbstractForcedSdpaBackend):
    """SDPA's cuDNN fused attention kernel."""

    name = AttentionBackendName.SDPA_CUDNN.value
    kernel = SDPBackend.CUDNN_ATTENTION
    support = {
        "cuda": DeviceSupport(dtypes=HALF_DTYPES, max_head_dim=256, min_cuda_capability=(8, 0), unit_head_stride=True)
    }


__all__ = [
    "AbstractForcedSdpaBackend",
    "SdpaBackend",
    "SdpaCudnnBackend",
    "SdpaEfficientBackend",
    "SdpaFlashBackend",
    "SdpaMathBackend",
]
