"""Which backend ``attention()`` runs right now.

Three context-local layers, highest precedence first: the ``attention_backend(...)`` context
manager, the per-model forward hooks, then the ``DIFFBLOCKS_ATTENTION_BACKEND`` environment
variable (default ``"sdpa"``). Whenever a layer changes, the winner is resolved once into
:data:`ACTIVE`, so a call reads one context variable and nothing else.

Dynamo cannot trace ``ContextVar.get``; compiled code reads :data:`COMPILE_MIRROR` instead, a
process-wide copy of the last activation. Dynamo guards on it, so selecting another backend
recompiles rather than silently reusing the old graph.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar, Token
from typing import Any

import diffblocks.components.attention.backends  # noqa: F401  # pyright: ignore[reportUnusedImport]  (registers the built-ins)
from diffblocks.components.attention.base import AbstractAttentionBackend
from diffblocks.components.attention.checks import CheckedAttentionBackend
from diffblocks.components.attention.registry import DEFAULT_BACKEND, backend_instance, resolve_attention_backend_name

ENV_BACKEND = "DIFFBLOCKS_ATTENTION_BACKEND"
ENV_CHECKS = "DIFFBLOCKS_ATTENTION_CHECKS"

Kernel = AbstractAttentionBackend | CheckedAttentionBackend
Tokens = tuple["Token[Any]", "Token[Kernel]"]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def backend_from_env(environ: Mapping[str, str]) -> str:
    """The backend named by ``DIFFBLOCKS_ATTENTION_BACKEND``, or ``"sdpa"`` when unset or empty."""
    value = environ.get(ENV_BACKEND, "").strip()
    if not value:
        return DEFAULT_BACKEND
    try:
        return resolve_attention_backend_name(value)
    except ValueError as error:
        raise ValueError(f"environment variable {ENV_BACKEND}: {error}") from None


def checks_from_env(environ: Mapping[str, str]) -> bool:
    """Whether ``DIFFBLOCKS_ATTENTION_CHECKS`` turns checks mode on."""
    value = environ.get(ENV_CHECKS, "").strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise ValueError(f"environment variable {ENV_CHECKS} must be one of 1/true/yes/on or 0/false/no/off, got {value!r}")


ENV_BACKEND_NAME = backend_from_env(os.environ)
ENV_CHECKS_ENABLED = checks_from_env(os.environ)

_KERNELS: dict[tuple[str, bool], Kernel] = {}


def kernel_for(name: str, *, checks: bool) -> Kernel:
    """The object ``attention()`` calls for ``name``, wrapped for checks mode when asked."""
    kernel = _KERNELS.get((name, checks))
    if kernel is None:
        backend = backend_instance(name)
        kernel = _KERNELS[(name, checks)] = CheckedAttentionBackend(backend) if checks else backend
    return kernel


_FORCED: ContextVar[str | None] = ContextVar("diffblocks_attention_forced", default=None)
_MODEL: ContextVar[str | None] = ContextVar("diffblocks_attention_model", default=None)
_CHECKS: ContextVar[bool] = ContextVar("diffblocks_attention_checks", default=ENV_CHECKS_ENABLED)
ACTIVE: ContextVar[Kernel] = ContextVar(
    "diffblocks_attention_active", default=kernel_for(ENV_BACKEND_NAME, checks=ENV_CHECKS_ENABLED)
)
COMPILE_MIRROR: list[Kernel] = [ACTIVE.get()]


def selected_name() -> str:
    """The backend name that wins the precedence in this context."""
    return _FORCED.get() or _MODEL.get() or ENV_BACKEND_NAME


def forced_name() -> str | None:
    """The backend name an ``attention_backend(...)`` context forces here, or None."""
    return _FORCED.get()


def checks_enabled() -> bool:
    """Whether checks mode is on in this context."""
    return _CHECKS.get()


def _activate() -> Token[Kernel]:
    kernel = kernel_for(selected_name(), checks=_CHECKS.get())
    token = ACTIVE.set(kernel)
    COMPILE_MIRROR[0] = kernel
    return token


def push_forced(name: str) -> Tokens:
    """Enter the context-manager layer; undo with :func:`pop`."""
    return _FORCED.set(name), _activate()


def push_model(name: str) -> Tokens:
    """Enter the per-model layer (a model's forward); undo with :func:`pop`."""
    return _MODEL.set(name), _activate()


def push_checks(enabled: bool) -> Tokens:
    """Turn checks mode on or off; undo with :func:`pop`."""
    return _CHECKS.set(enabled), _activate()


def pop(tokens: Tokens) -> None:
    """Undo one push, restoring the layer and the active kernel exactly as they were."""
    layer_token, active_token = tokens
    ACTIVE.reset(active_token)
    layer_token.var.reset(layer_token)
    COMPILE_MIRROR[0] = ACTIVE.get()
