"""The one attention seam every model calls.

Models call :func:`attention`; backends (PyTorch SDPA and its forced kernels, flex attention,
flash-attn 2/3, SageAttention, xFormers, a plain reference) plug in behind it and are chosen by
value with :func:`attention_backend`, :func:`set_attention_backend` or the
``DIFFBLOCKS_ATTENTION_BACKEND`` environment variable.
"""

from diffblocks.components.attention.base import AbstractAttentionBackend
from diffblocks.components.attention.checks import CheckedAttentionBackend, attention_input_errors
from diffblocks.components.attention.dispatch import attention
from diffblocks.components.attention.errors import (
    AttentionBackendUnavailableError,
    AttentionInputError,
    UnsupportedAttentionError,
)
from diffblocks.components.attention.registry import (
    AttentionBackendName,
    attention_backend_names,
    get_attention_backend,
    register_attention_backend,
)
from diffblocks.components.attention.selection import (
    attention_backend,
    attention_backend_for,
    attention_checks,
    attention_checks_enabled,
    current_attention_backend,
    model_attention_backend,
    reset_attention_backend,
    set_attention_backend,
)
from diffblocks.components.attention.support import (
    ANY_DEVICE,
    CausalSupport,
    DeviceSupport,
    PackageRequirement,
)

__all__ = [
    "ANY_DEVICE",
    "AbstractAttentionBackend",
    "AttentionBackendName",
    "AttentionBackendUnavailableError",
    "AttentionInputError",
    "CausalSupport",
    "CheckedAttentionBackend",
    "DeviceSupport",
    "PackageRequirement",
    "UnsupportedAttentionError",
    "attention",
    "attention_backend",
    "attention_backend_for",
    "attention_backend_names",
    "attention_checks",
    "attention_checks_enabled",
    "attention_input_errors",
    "current_attention_backend",
    "get_attention_backend",
    "model_attention_backend",
    "register_attention_backend",
    "reset_attention_backend",
    "set_attention_backend",
]
