"""xFormers ``memory_efficient_attention``, imported on demand."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import final

import torch
from torch import Tensor

from diffblocks.components.attention.base import AbstractAttentionBackend
from diffblocks.components.attention.errors import AttentionBackendUnavailableError
from diffblocks.components.attention.registry import AttentionBackendName, register_attention_backend
from diffblocks.components.attention.support import DeviceSupport, HALF_DTYPES, PackageRequirement

# xFormers reads a tensor bias in 128-bit chunks: every stride but the last must be a multiple
# of this many elements (8 for fp16/bf16, 4 for fp32)
_BIAS_ALIGNMENT_BITS = 128

# xFormers imports even when its compiled library was built for another torch or Python; every
# call then fails with "No operator found". Said once, when the backend is chosen, instead.
_MSG_KERNELS_NOT_LOADED = (
    "a build for torch {torch} (the installed one's compiled kernels did not load; "
    "`python -m xformers.info` shows what it was built for)"
)


def _aligned_bias(mask: Tensor, q: Tensor, seq_k: int) -> Tensor:
    """``mask`` as an additive ``(batch, heads, seq_q, seq_k)`` bias in q's dtype, stride-aligned."""
    batch, heads, seq_q = q.shape[0], q.shape[1], q.shape[2]
    alignment = _BIAS_ALIGNMENT_BITS // torch.finfo(q.dtype).bits
    padded = -(-seq_k // alignment) * alignment
    bias = torch.zeros(batch, heads, seq_q, padded, dtype=q.dtype, device=q.device)[..., :seq_k]
    if mask.dtype == torch.bool:
        return bias.masked_fill_(~mask.expand(batch, heads, seq_q, seq_k), float("-inf"))
    return bias.copy_(mask.expand(batch, heads, seq_q, seq_k))


@final
@register_attention_backend
class XformersBackend(AbstractAttentionBackend):
    """``xformers.ops.memory_efficient_attention`` (Rabe & Staats, 2021) over ``(batch, seq, heads, head_dim)``.

    Masks become an aligned additive bias tensor; ``is_causal`` becomes xFormers'
    ``LowerTriangularMask``, which is top-left aligned like the seam's.
    """

    name = AttentionBackendName.XFORMERS.value
    requirement = PackageRequirement(module="xformers.ops", package="xformers", install="pip install xformers")
    support = {"cuda": DeviceSupport(dtypes=HALF_DTYPES | {torch.float32}, min_cuda_capability=(6, 0))}

    def __init__(self) -> None:
        self._ops: ModuleType | None = None

    def _load(self) -> ModuleType:
        assert self.requirement is not None, "the xFormers backend always names its package"
        ops = self.requirement.load(backend=self.name)
        if not getattr(sys.modules["xformers"], "_has_cpp_library", True):
            hint = _MSG_KERNELS_NOT_LOADED.format(torch=torch.__version__)
            raise AttentionBackendUnavailableError(backend=self.name, package=self.requirement.package, install=hint)
        self._ops = ops
        return ops

    def ensure_available(self) -> None:
        """Import xFormers now, failing by name when it is missing or its kernels did not load."""
        if self._ops is None:
            self._load()

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float | None, is_causal: bool
    ) -> Tensor:
        ops = self._ops or self._load()
        if mask is not None:
            bias: object = _aligned_bias(mask, q, k.shape[-2])
        elif is_causal:
            bias = ops.LowerTriangularMask()
        else:
            bias = None
        out = ops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
        )
        return out.transpose(1, 2)


__all__ = ["XformersBackend"]
