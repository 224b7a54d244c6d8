"""The perturbation seam: which perturbation the forwards of this context run with.

A perturbation does not change the model it perturbs. It resolves, once per model, what to do
before or after the forward of some of its modules (:class:`PerturbationHooks`), and a
perturbed pass makes those hooks active in the current context only (:func:`activated`): the
thread or task that runs the pass sees them, every other one runs the plain model. The modules
carry one dispatcher each, put there on first use and kept (:func:`install`); it reads
:data:`ACTIVE` and does nothing when no pass is active, so two threads sharing a model run a
plain and a perturbed pass at the same time, and a forward outside a pass is never perturbed.

Dynamo cannot trace ``ContextVar.get``; compiled code reads :data:`COMPILE_MIRROR` instead, a
process-wide copy of the last activation (as the attention backends do), so inside a compiled
model the last activation wins across threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, final
from weakref import WeakKeyDictionary

from torch import nn
from torch.compiler import is_dynamo_compiling
from torch.utils.hooks import RemovableHandle

Scratch = dict[object, Any]
"""What the hooks of one pass hand each other during its forward (the values a layer computed)."""
Before = Callable[[Scratch, tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]] | None]
"""``before(scratch, args, kwargs)``: new ``(args, kwargs)`` for the module's forward, or None to keep them."""
After = Callable[[Scratch, tuple[Any, ...], dict[str, Any], Any], Any]
"""``after(scratch, args, kwargs, output)``: the module's new output, or None to keep it."""


@final
class PerturbationHooks:
    """What one perturbation does to the modules of one model, before and after their forwards."""

    __slots__ = ("after", "before", "installed")

    def __init__(self) -> None:
        self.before: dict[nn.Module, Before] = {}
        self.after: dict[nn.Module, After] = {}
        self.installed = -1  # the install epoch whose dispatchers these modules carry


@final
class _Pass:
    """One perturbed forward: the hooks it runs, and their scratch (fresh per pass, so passes never share it)."""

    __slots__ = ("hooks", "scratch")

    def __init__(self, hooks: PerturbationHooks) -> None:
        self.hooks = hooks
        self.scratch: Scratch = {}


ACTIVE: ContextVar[_Pass | None] = ContextVar("diffblocks_perturbed_pass", default=None)
COMPILE_MIRROR: list[_Pass | None] = [None]


@contextmanager
def activated(hooks: PerturbationHooks) -> Iterator[None]:
    """Run ``hooks`` on the forwards made inside the ``with`` block, in this context only."""
    install(hooks)
    token = ACTIVE.set(_Pass(hooks))
    COMPILE_MIRROR[0] = ACTIVE.get()
    try:
        yield
    finally:
        ACTIVE.reset(token)
        COMPILE_MIRROR[0] = ACTIVE.get()


def _active() -> _Pass | None:
    # ContextVar.get would break the graph; the mirror is a plain global dynamo can guard on
    return COMPILE_MIRROR[0] if is_dynamo_compiling() else ACTIVE.get()


def _dispatch_before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    active = _active()
    if active is None:
        return None
    hook = active.hooks.before.get(module)
    return None if hook is None else hook(active.scratch, args, kwargs)


def _dispatch_after(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    active = _active()
    if active is None:
        return None
    hook = active.hooks.after.get(module)
    return None if hook is None else hook(active.scratch, args, kwargs, output)


_BEFORE: WeakKeyDictionary[nn.Module, RemovableHandle] = WeakKeyDictionary()
_AFTER: WeakKeyDictionary[nn.Module, RemovableHandle] = WeakKeyDictionary()
_EPOCH = [0]  # advanced by every removal, so hooks installed before it are installed again
_INSTALLING = threading.Lock()


def install(hooks: PerturbationHooks) -> None:
    """Put a dispatcher on each module ``hooks`` acts on, unless it has one (they stay until :func:`remove`)."""
    if hooks.installed == _EPOCH[0]:
        return
    with _INSTALLING:
        for module in hooks.before:
            if module not in _BEFORE:
                _BEFORE[module] = module.register_forward_pre_hook(_dispatch_before, with_kwargs=True)
        for module in hooks.after:
            if module not in _AFTER:
                _AFTER[module] = module.register_forward_hook(_dispatch_after, with_kwargs=True)
        hooks.installed = _EPOCH[0]


def remove(model: nn.Module) -> None:
    """Take the dispatchers off ``model`` and its submodules, leaving it exactly as before the first pass."""
    with _INSTALLING:
        for module in model.modules():
            for table in (_BEFORE, _AFTER):
                handle = table.pop(module, None)
                if handle is not None:
                    handle.remove()
        _EPOCH[0] += 1
