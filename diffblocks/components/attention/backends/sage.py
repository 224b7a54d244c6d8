"""SageAttention: int8-quantised QKᵀ with higher-precision PV, imported on demand."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import final

from torch import Tensor

from diffblocks.components.attention.base import AbstractAttentionBackend
from diffblocks.components.attention.registry import AttentionBackendName, register_attention_backend
from diffblocks.components.attention.support import CausalSupport, DeviceSupport, HALF_DTYPES, PackageRequirement

SageKernel = Callable[..., "Tensor | tuple[Tensor, ...]"]

# its Triton kernels load a partial last key block as zeros without masking the scores, so
# the padding keys still take softmax weight: shorter tails come out wrong, not refused
_KEY_BLOCK = 64


def _smooths_k_in_place() -> bool:
    """sageattention 1.x subtracts k's mean from the caller's k tensor (and q, when q is k)."""
    try:
        return version("sageattention").split(".")[0] in ("0", "1")
    except PackageNotFoundError:  # imported from a source tree: assume the older behaviour
        return True


@final
@register_attention_backend
class SageAttentionBackend(AbstractAttentionBackend):
    """``sageattention.sageattn`` (Zhang et al., 2024, "SageAttention"); approximate, not exact.

    It reads our ``(batch, heads, seq, head_dim)`` layout directly ("HND"). Masks, a v head_dim
    other than q's, causal attention over unequal lengths and key lengths off its 64-key blocks
    would each be computed wrongly without an error, so they are refused up front.
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
            key_length_multiple=_KEY_BLOCK,
        )
    }

    def __init__(self) -> None:
        self._sageattn: SageKernel | None = None
        self._copy_k = True

    def _load(self) -> SageKernel:
        assert self.requirement is not None, "the SageAttention backend always names its package"
        sageattn: SageKernel = self.requirement.load(backend=self.name).sageattn
        self._copy_k = _smooths_k_in_place()
        self._sageattn = sageattn
        return sageattn

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float | None, is_causal: bool
    ) -> Tensor:
        seq_k = k.shape[-2]
        if mask is not None or v.shape[-1] != q.shape[-1] or (is_causal and q.shape[-2] != seq_k) or seq_k % _KEY_BLOCK:
            raise self.refusal(q, k, v, mask=mask, is_causal=is_causal)
        sageattn = self._sageattn or self._load()
        out = sageattn(q, k.clone() if self._copy_k else k, v, tensor_layout="HND", is_causal=is_causal, sm_scale=scale)
        return out[0] if isinstance(out, tuple) else out


__all__ = ["SageAttentionBackend"]
