"""What an attention backend declares it can run, and the optional package it needs."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import ModuleType

import torch

from diffblocks.components.attention.errors import AttentionBackendUnavailableError

ANY_DEVICE = "*"
"""Key of :attr:`AbstractAttentionBackend.support` that covers every device type not listed."""

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
HALF_DTYPES = frozenset({torch.float16, torch.bfloat16})


class CausalSupport(Enum):
    """How a backend handles ``is_causal=True``.

    The seam's causal mask is aligned top-left (query ``i`` sees keys ``0..i``), as in
    ``torch.nn.functional.scaled_dot_product_attention``. Kernels that align it bottom-right
    (flash-attn, SageAttention) agree only when query and key lengths are equal, and some
    (SDPA's CUDA flash kernel) refuse unequal lengths outright.
    """

    NONE = "none"
    EQUAL_LENGTHS = "equal_lengths"
    ANY = "any"


@dataclass(frozen=True)
class DeviceSupport:
    """The calls a backend can run on one device type.

    Args:
        dtypes: accepted dtypes of q, k and v.
        bool_mask: accepts a boolean mask (True = attend).
        additive_mask: accepts a float mask added to the scores.
        causal: how ``is_causal=True`` is handled.
        max_head_dim: largest accepted head_dim, or None for no limit.
        distinct_value_head_dim: v's head_dim may differ from q's and k's.
        min_cuda_capability: smallest CUDA compute capability, (major, minor), or None.
        key_length_multiple: seq_k must be a multiple of this (kernels that leave a partial
            last key block unmasked).
        unit_head_stride: q, k and v need stride 1 along head_dim (fused kernels that read each
            head's vector as one contiguous row).
    """

    dtypes: frozenset[torch.dtype]
    bool_mask: bool = True
    additive_mask: bool = True
    causal: CausalSupport = CausalSupport.ANY
    max_head_dim: int | None = None
    distinct_value_head_dim: bool = True
    min_cuda_capability: tuple[int, int] | None = None
    key_length_multiple: int = 1
    unit_head_stride: bool = False

    def __post_init__(self) -> None:
        if not self.dtypes:
            raise ValueError("DeviceSupport needs at least one dtype")
        not_float = sorted(str(d) for d in self.dtypes if not d.is_floating_point)
        if not_float:
            raise ValueError(f"DeviceSupport dtypes must be floating point, got {not_float}")
        if self.max_head_dim is not None and self.max_head_dim < 1:
            raise ValueError(f"max_head_dim must be >= 1, got {self.max_head_dim}")
        if self.key_length_multiple < 1:
            raise ValueError(f"key_length_multiple must be >= 1, got {self.key_length_multiple}")


BackendSupport = Mapping[str, DeviceSupport]
"""Device type (``"cuda"``, ``"cpu"``, ... or :data:`ANY_DEVICE`) → what runs there."""


@dataclass(frozen=True)
class PackageRequirement:
    """An optional package a backend imports only when it is asked for.

    Args:
        module: import name, e.g. ``"flash_attn"``.
        package: distribution name shown to the user, e.g. ``"flash-attn"``.
        install: how to install it, e.g. ``"pip install flash-attn"``.
    """

    module: str
    package: str
    install: str

    def is_installed(self) -> bool:
        """Whether the module can be found, importing at most its parent packages."""
        try:
            return importlib.util.find_spec(self.module) is not None
        except ImportError:  # a dotted name whose parent package is missing
            return False

    def load(self, *, backend: str) -> ModuleType:
        """Import the module, or fail naming ``backend``, the package and the install hint."""
        try:
            return importlib.import_module(self.module)
        except ImportError as error:
            raise AttentionBackendUnavailableError(
                backend=backend, package=self.package, install=self.install
            ) from error


__all__ = [
    "ANY_DEVICE",
    "FLOAT_DTYPES",
    "HALF_DTYPES",
    "BackendSupport",
    "CausalSupport",
    "DeviceSupport",
    "PackageRequirement",
]
