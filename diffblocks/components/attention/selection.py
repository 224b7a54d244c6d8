"""Choosing the attention backend by value: per block of code, per model, or by environment.

Precedence, highest first: ``with attention_backend(...)`` > ``set_attention_backend(model, ...)``
> ``DIFFBLOCKS_ATTENTION_BACKEND`` > ``"sdpa"``. Nothing is monkeypatched: every layer is a
context variable that ``attention()`` reads through one lookup.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Generator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.compiler import is_dynamo_compiling
from torch.utils.hooks import RemovableHandle

from diffblocks.components.attention import _state
from diffblocks.components.attention.base import AbstractAttentionBackend
from diffblocks.components.attention.checks import CheckedAttentionBackend
from diffblocks.components.attention.registry import (
    AttentionBackendName,
    backend_instance,
    get_attention_backend,
    resolve_attention_backend_name,
)


@contextmanager
def attention_backend(backend: str | AttentionBackendName) -> Generator[AbstractAttentionBackend, None, None]:
    """Run every ``attention()`` call inside the block on ``backend``, overriding per-model choices.

    Args:
        backend: a registered name such as ``"sdpa_math"`` or ``AttentionBackendName.FLEX``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
        AttentionBackendUnavailableError: the backend's package is not installed.

    Example:
        >>> with attention_backend("reference") as chosen:
        ...     assert chosen.name == "reference"
    """
    name = resolve_attention_backend_name(backend)
    chosen = get_attention_backend(name)
    tokens = _state.push_forced(name)
    try:
        yield chosen
    finally:
        _state.pop(tokens)


@contextmanager
def attention_checks(enabled: bool = True) -> Generator[None, None, None]:
    """Validate devices, dtypes, shapes, mask and backend support before each call in the block.

    Off by default (or on with ``DIFFBLOCKS_ATTENTION_CHECKS=1``); when off, calls pay nothing.
    """
    tokens = _state.push_checks(enabled)
    try:
        yield
    finally:
        _state.pop(tokens)


def current_attention_backend() -> AbstractAttentionBackend:
    """The backend ``attention()`` would use here and now (after all precedence rules)."""
    if is_dynamo_compiling():
        kernel = _state.COMPILE_MIRROR[0]
        return kernel.backend if isinstance(kernel, CheckedAttentionBackend) else kernel
    return backend_instance(_state.selected_name())


def attention_checks_enabled() -> bool:
    """Whether checks mode is on in the current context."""
    return _state.checks_enabled()


class _TokenStack(threading.local):
    """Per-thread stack of selections a model's forward pushed (it may re-enter itself)."""

    def __init__(self) -> None:
        self.items: list[_state.Tokens] = []


@dataclass(eq=False)
class _ModelBinding:
    """A model's backend and the hook pair that selects it for the duration of its forward."""

    name: str
    handles: list[RemovableHandle] = field(default_factory=list[RemovableHandle])
    tokens: _TokenStack = field(default_factory=_TokenStack)

    def enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.tokens.items.append(_state.push_model(self.name))

    def exit(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        _state.pop(self.tokens.items.pop())


_BINDINGS: weakref.WeakKeyDictionary[nn.Module, _ModelBinding] = weakref.WeakKeyDictionary()


def _outside_compile(hook: Callable[..., None]) -> Callable[..., None]:
    # contextvars are opaque to dynamo; running the hooks eagerly lets a compiled model keep its
    # forward in one graph, which then reads the backend the hook just selected
    return cast(Callable[..., None], torch.compiler.disable(hook))


def set_attention_backend(model: nn.Module, backend: str | AttentionBackendName) -> None:
    """Make ``model`` (and everything its forward calls) use ``backend``.

    Implemented as a forward pre-hook/post-hook pair that sets a context variable for the
    duration of ``model``'s forward, so two models in one pipeline can use different backends.
    Calling it again replaces the previous choice; :func:`reset_attention_backend` undoes it.

    Args:
        model: any ``nn.Module``; nothing on it changes except the two hooks.
        backend: a registered name such as ``"flash_attn_2"``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
        AttentionBackendUnavailableError: the backend's package is not installed.
    """
    name = resolve_attention_backend_name(backend)
    get_attention_backend(name)
    reset_attention_backend(model)
    binding = _ModelBinding(name)
    binding.handles.append(model.register_forward_pre_hook(_outside_compile(binding.enter)))
    # always_call: restore the selection even when forward raises
    binding.handles.append(model.register_forward_hook(_outside_compile(binding.exit), always_call=True))
    _BINDINGS[model] = binding


def reset_attention_backend(model: nn.Module) -> None:
    """Remove the backend set on ``model`` by :func:`set_attention_backend`; a no-op if none is set."""
    binding = _BINDINGS.pop(model, None)
    if binding is not None:
        for handle in binding.handles:
            handle.remove()


def model_attention_backend(model: nn.Module) -> str | None:
    """The backend name set on ``model``, or None when it follows the surrounding selection."""
    binding = _BINDINGS.get(model)
    return None if binding is None else binding.name


def attention_backend_for(model: nn.Module) -> str:
    """The backend name ``model``'s attention would run with if it were called here and now.

    The precedence of :func:`current_attention_backend`, seen from outside the model's forward:
    an ``attention_backend(...)`` context, else the model's own (:func:`set_attention_backend`),
    else the environment's. The memory planner reads it to estimate what attention will hold.
    """
    return _state.forced_name() or model_attention_backend(model) or _state.ENV_BACKEND_NAME


__all__ = [
    "attention_backend",
    "attention_backend_for",
    "attention_checks",
    "attention_checks_enabled",
    "current_attention_backend",
    "model_attention_backend",
    "reset_attention_backend",
    "set_attention_backend",
]
