"""Per call, the fastest installed exact backend that supports it; SDPA otherwise."""

from __future__ import annotations

from typing import ClassVar, final

import torch
from torch import Tensor

from diffblocks.components.attention.base import AbstractAttentionBackend
from diffblocks.components.attention.errors import AttentionBackendUnavailableError
from diffblocks.components.attention.registry import AttentionBackendName, backend_instance, register_attention_backend
from diffblocks.components.attention.support import ANY_DEVICE, FLOAT_DTYPES, DeviceSupport

# what decides whether a candidate supports a call: device, dtype, head dims, mask kind, causal
# with equal or unequal lengths
_CallSignature = tuple[torch.device, torch.dtype, int, int, "torch.dtype | None", bool, bool]


@final
@register_attention_backend
class AutoBackend(AbstractAttentionBackend):
    """Try ``preference`` in order, keep the first installed one that declares support for the
    call, and fall back to ``sdpa`` (which runs everything). Only exact kernels are candidates.

    The choice is cached per call signature, so the declared-support check runs once per shape
    family, not per call.
    """

    name = AttentionBackendName.AUTO.value
    support = {ANY_DEVICE: DeviceSupport(dtypes=FLOAT_DTYPES)}
    preference: ClassVar[tuple[str, ...]] = (
        AttentionBackendName.FLASH_ATTN_3.value,
        AttentionBackendName.FLASH_ATTN_2.value,
    )
    fallback: ClassVar[str] = AttentionBackendName.SDPA.value

    def __init__(self) -> None:
        self._chosen: dict[_CallSignature, AbstractAttentionBackend] = {}
        self._candidates: tuple[AbstractAttentionBackend, ...] | None = None

    def candidates(self) -> tuple[AbstractAttentionBackend, ...]:
        """The preferred backends whose packages are installed, in preference order."""
        if self._candidates is None:
            found: list[AbstractAttentionBackend] = []
            for name in self.preference:
                backend = backend_instance(name)
                if backend.exact and backend.is_installed():
                    found.append(backend)
            self._candidates = tuple(found)
        return self._candidates

    def choose(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, is_causal: bool) -> AbstractAttentionBackend:
        """The backend this call runs on."""
        signature: _CallSignature = (
            q.device,
            q.dtype,
            q.shape[-1],
            v.shape[-1],
            None if mask is None else mask.dtype,
            is_causal,
            q.shape[-2] == k.shape[-2],
        )
        chosen = self._chosen.get(signature)
        if chosen is None:
            chosen = self._chosen[signature] = self._first_supporting(q, k, v, mask=mask, is_causal=is_causal)
        return chosen

    def _first_supporting(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, is_causal: bool
    ) -> AbstractAttentionBackend:
        for backend in self.candidates():
            if backend.unsupported_reasons(q, k, v, mask=mask, is_causal=is_causal):
                continue
            try:
                backend.ensure_available()
            except AttentionBackendUnavailableError:  # found on disk but fails to import (e.g. a CUDA mismatch)
                continue
            return backend
        return backend_instance(self.fallback)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float | None, is_causal: bool
    ) -> Tensor:
        backend = self.choose(q, k, v, mask=mask, is_causal=is_causal)
        return backend.forward(q, k, v, mask=mask, scale=scale, is_causal=is_causal)


__all__ = ["AutoBackend"]
