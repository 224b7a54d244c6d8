"""SageAttention: int8-quantised QKᵀ with higher-precision PV, imported on demand."""

from __future__ import annotations

from collections.abc import Callable
from typing import final

from torch import Tensor

from diffblocks.components.attention.base import AbstractAttentionBackend
from diffblocks.components.attention.registry import AttentionBackendName, register_attention_backend
from diffblocks.components.attention.support import CausalSupport, DeviceSupport, HALF_DTYPES, PackageRequirement

SageKernel = Callable[..., "Tensor | tuple[Tensor, ...]"]


@final
@register_attention_backend
class SageAttentionBackend(AbstractAttentionBackend):
    """``sageattention.sageattn`` (Zhang et al., 2024, "SageAttention"); approximate, not exact.

    It reads our ``(batch, heads, seq, head_dim)`` layout directly ("HND"). It takes no mask and
    aligns its causal mask bottom-right, so both are refused rather than silently changed.
    """

    name = AttentionBackendName.SAGEATTENTION.value
    requirement = PackageRequirement(module="sageattention", package="sageattention", install="pip install sageattention")
    exact = False
    support = {
        "cuda": DeviceSupport(
            dtypes=HALF_DTYPES,
            bool_mask=False,
            additive_mask=False,
            causal=CausalSupport.EQUAL_LENGTHS,
            max_head_dim=128,
            distinct_value_head_dim=False,
            min_cuda_capability=(8, 0),
        )
    }

    def __init__(self) -> None:
        self._sageattn: SageKernel | None = None

    def _load(self) -> SageKernel:
        assert self.requirement is not None, "the SageAttention backend always names its package"
        self._sageattn = self.requirement.load(backend=self.name).sageattn
        return self._sageattn

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float | None, is_causal: bool
    ) -> Tensor:
        if mask is not None or (is_causal and q.shape[-2] != k.shape[-2]):
            raise self.refusal(q, k, v, mask=mask, is_causal=is_causal)
        sageattn = self._sageattn or self._load()
        out = sageattn(q, k, v, tensor_layout="HND", is_causal=is_causal, sm_scale=scale)
        return out[0] if isinstance(out, tuple) else out


__all__ = ["SageAttentionBackend"]
