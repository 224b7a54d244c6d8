"""Backend names and the registry that maps them to backend classes."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from diffblocks.components.attention.base import AbstractAttentionBackend


class AttentionBackendName(str, Enum):
    """Names of the built-in backends; any registered name is accepted as a plain string too."""

    AUTO = "auto"
    SDPA = "sdpa"
    SDPA_MATH = "sdpa_math"
    SDPA_FLASH = "sdpa_flash"
    SDPA_EFFICIENT = "sdpa_efficient"
    SDPA_CUDNN = "sdpa_cudnn"
    FLEX = "flex"
    FLASH_ATTN_2 = "flash_attn_2"
    FLASH_ATTN_3 = "flash_attn_3"
    SAGEATTENTION = "sageattention"
    XFORMERS = "xformers"
    REFERENCE = "reference"

    def __str__(self) -> str:
        return self.value


DEFAULT_BACKEND = AttentionBackendName.SDPA.value

_CLASSES: dict[str, type[AbstractAttentionBackend]] = {}
_INSTANCES: dict[str, AbstractAttentionBackend] = {}

BackendT = TypeVar("BackendT", bound=type[AbstractAttentionBackend])


def register_attention_backend(cls: BackendT) -> BackendT:
    """Class decorator adding a final backend class to the registry under ``cls.name``."""
    name = str(cls.name)
    if name in _CLASSES:
        raise ValueError(f"attention backend '{name}' is already registered by {_CLASSES[name].__qualname__}")
    _CLASSES[name] = cls
    return cls


def attention_backend_names() -> tuple[str, ...]:
    """Every registered backend name, sorted."""
    return tuple(sorted(_CLASSES))


def resolve_attention_backend_name(name: str | AttentionBackendName) -> str:
    """The registry key for ``name``; unknown names raise a ValueError listing the known ones."""
    key = name.value if isinstance(name, AttentionBackendName) else name
    if key not in _CLASSES:
        raise ValueError(f"unknown attention backend {key!r}; known backends: {', '.join(attention_backend_names())}")
    return key


def backend_instance(name: str | AttentionBackendName) -> AbstractAttentionBackend:
    """The shared instance of a backend, without importing its optional package."""
    key = resolve_attention_backend_name(name)
    backend = _INSTANCES.get(key)
    if backend is None:
        backend = _INSTANCES[key] = _CLASSES[key]()
    return backend


def get_attention_backend(name: str | AttentionBackendName) -> AbstractAttentionBackend:
    """The backend registered as ``name``, with its optional package imported.

    Raises:
        ValueError: ``name`` is not registered.
        AttentionBackendUnavailableError: its package is missing (the message says how to install it).
    """
    backend = backend_instance(name)
    backend.ensure_available()
    return backend


__all__ = [
    "DEFAULT_BACKEND",
    "AttentionBackendName",
    "attention_backend_names",
    "backend_instance",
    "get_attention_backend",
    "register_attention_backend",
    "resolve_attention_backend_name",
]
