"""The interface every attention backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from diffblocks.components.attention.errors import UnsupportedAttentionError
from diffblocks.components.attention.support import (
    ANY_DEVICE,
    BackendSupport,
    CausalSupport,
    DeviceSupport,
    PackageRequirement,
)


def _dtype_names(dtypes: frozenset[torch.dtype]) -> str:
    return ", ".join(sorted(str(dtype).removeprefix("torch.") for dtype in dtypes))


class AbstractAttentionBackend(ABC):
    """One attention kernel behind :func:`~diffblocks.components.attention.attention`.

    A backend is a final subclass that declares its name, what it supports and the optional
    package it needs, and implements :meth:`forward` over ``(batch, heads, seq, head_dim)``
    tensors. Constructing one is cheap and never imports its package; that happens in
    :meth:`ensure_available` or on the first :meth:`forward`.
    """

    name: ClassVar[str]
    """Registry key, e.g. ``"sdpa_math"``."""
    support: ClassVar[BackendSupport]
    """What runs on each device type; see :class:`DeviceSupport`."""
    requirement: ClassVar[PackageRequirement | None] = None
    """The optional package this backend imports, or None when torch is enough."""
    exact: ClassVar[bool] = True
    """False for kernels that trade accuracy for speed (e.g. SageAttention's int8 QK)."""

    @abstractmethod
    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        mask: Tensor | None,
        scale: float | None,
        is_causal: bool,
    ) -> Tensor:
        """Attention over ``(batch, heads, seq, head_dim)``; same contract as ``attention()``."""

    def ensure_available(self) -> None:
        """Import the optional package now, failing with its name and install hint."""
        if self.requirement is not None:
            self.requirement.load(backend=self.name)

    def is_installed(self) -> bool:
        """Whether the optional package can be found (without importing it)."""
        return self.requirement is None or self.requirement.is_installed()

    def device_support(self, device: torch.device) -> DeviceSupport | None:
        """The declared support for ``device``'s type, or None when it cannot run there."""
        return self.support.get(device.type) or self.support.get(ANY_DEVICE)

    def unsupported_reasons(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, is_causal: bool
    ) -> list[str]:
        """Every way this call falls outside the declared support; empty when it is supported."""
        device = q.device
        rules = self.device_support(device)
        if rules is None:
            return [f"device type '{device.type}' is not supported (supported: {', '.join(sorted(self.support))})"]
        reasons: list[str] = []
        if q.dtype not in rules.dtypes:
            reasons.append(
                f"dtype {str(q.dtype).removeprefix('torch.')} is not supported on {device.type} "
                f"(supported: {_dtype_names(rules.dtypes)})"
            )
        if mask is not None:
            if mask.dtype == torch.bool and not rules.bool_mask:
                reasons.append(f"boolean masks are not supported on {device.type}")
            elif mask.dtype != torch.bool and not rules.additive_mask:
                reasons.append(f"additive float masks are not supported on {device.type}")
        seq_q, seq_k = q.shape[-2], k.shape[-2]
        if is_causal and rules.causal is CausalSupport.NONE:
            reasons.append(f"is_causal=True is not supported on {device.type}")
        elif is_causal and rules.causal is CausalSupport.EQUAL_LENGTHS and seq_q != seq_k:
            reasons.append(f"is_causal=True needs seq_q == seq_k with this kernel, got seq_q {seq_q} and seq_k {seq_k}")
        if seq_k % rules.key_length_multiple:
            reasons.append(f"seq_k {seq_k} must be a multiple of {rules.key_length_multiple}")
        head_dim = q.shape[-1]
        if rules.max_head_dim is not None and head_dim > rules.max_head_dim:
            reasons.append(f"head_dim {head_dim} exceeds the maximum {rules.max_head_dim}")
        if not rules.distinct_value_head_dim and v.shape[-1] != head_dim:
            reasons.append(f"v head_dim {v.shape[-1]} must equal the q/k head_dim {head_dim}")
        strided = [name for name, tensor in (("q", q), ("k", k), ("v", v)) if tensor.stride(-1) != 1]
        if rules.unit_head_stride and strided:
            reasons.append(f"{', '.join(strided)} must have stride 1 along head_dim with this kernel (pass .contiguous())")
        if rules.min_cuda_capability is not None and device.type == "cuda":
            capability = torch.cuda.get_device_capability(device)
            if capability < rules.min_cuda_capability:
                wanted = "sm{}{}".format(*rules.min_cuda_capability)
                reasons.append(f"needs a GPU of compute capability {wanted} or newer, got sm{capability[0]}{capability[1]}")
        return reasons

    def refusal(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, is_causal: bool
    ) -> UnsupportedAttentionError:
        """The error to raise for a call this backend cannot run faithfully."""
        reasons = self.unsupported_reasons(q, k, v, mask=mask, is_causal=is_causal)
        return UnsupportedAttentionError(backend=self.name, reasons=reasons or ["these inputs are not supported"])

    def __repr__(self) -> str:
        return f"<attention backend '{self.name}'>"


__all__ = ["AbstractAttentionBackend"]
