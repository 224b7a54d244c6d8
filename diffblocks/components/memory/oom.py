"""Out of memory during a call: free what the failed step held, tighten the plan, retry the step.

A pipeline step is a block: it reads its inputs from the run's state and writes its outputs back
only when it returns, so a step that runs out of memory has changed nothing and can run again.
Relief comes in this order, the cheapest first, all decided here (:class:`Reliefs`):

1. Reliefs the step's components offered while it ran (:func:`offer_relief`): a guided step that
   batches its guidance passes offers to run them one by one for the rest of the call
   (:meth:`~diffblocks.components.guiders.GuidanceConditions.run_sequentially`): the same weights,
   half the activations, no extra traffic. The component only says what it can do; whether and
   when is decided here.
2. Then the manager's (``Relieve``): blocks kept on the device in a spare budget are streamed
   too, then the offload policy moves one rung down the planner's ladder
   (:data:`~diffblocks.components.memory.LADDER`: ``NoOffload`` -> ``ModelOffload`` ->
   ``GroupOffload`` -> ... -> ``LeafOffload``). A warning says what changed.

After each, the step runs again (:func:`run_relieved`). Every try goes through :func:`attempt`,
which catches the error and frees memory *after* the ``except`` block: inside it, the traceback
would keep the failed forward's frames, and so its activations, alive during the retry.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar, final

import torch

T = TypeVar("T")


class OffloadTightened(UserWarning):
    """The offload policy was tightened during a call after an out-of-memory error."""


class OutOfMemory:
    """What :func:`attempt` returns when the call ran out of memory: the error's first line, for a later message."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def attempt(fn: Callable[[], T]) -> T | OutOfMemory:
    """``fn()``, or an :class:`OutOfMemory` once the failed call's memory is freed.

    Example:
        >>> def too_big() -> None:
        ...     raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        >>> attempt(too_big).message
        'CUDA out of memory. Tried to allocate 2.00 GiB'
        >>> attempt(lambda: 3)
        3
    """
    try:
        return fn()
    except torch.OutOfMemoryError as error:
        message = str(error).splitlines()[0] if str(error) else "out of memory"
    free_memory()  # the except block has ended: the failed call's frames are gone
    return OutOfMemory(message)


def free_memory() -> None:
    """Collect garbage and give the CUDA caching allocator's free blocks back, so a retry finds them."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


Relieve = Callable[[str, str], bool]
"""Told the failed step's path and the error's first line after an out-of-memory error; returns
whether it made room (then the step runs again) or had nothing left to give (then the error stands)."""


_MSG_NO_RELIEF = (
    "{message} (in block {where!r}; no cheaper placement is left: generate a smaller image or batch, "
    "or quantize the largest model, see docs/memory.md)"
)


@final
class Reliefs:
    """The relief ladder of one step: what its components offered as it ran, then ``fallback`` (the manager's).

    Args:
        fallback: told the step and the error after the offered reliefs are spent; returns whether
            it made room (None: nothing beyond the offered reliefs).
    """

    def __init__(self, fallback: Relieve | None = None) -> None:
        self.fallback = fallback
        self._offered: dict[int, Callable[[], None]] = {}  # by the id of who offered it: each once

    def offer(self, owner: object, relief: Callable[[], None]) -> None:
        self._offered.setdefault(id(owner), relief)

    def relieve(self, where: str, message: str) -> bool:
        """Apply the cheapest relief left; False when none is."""
        if self._offered:
            key = next(iter(self._offered))
            self._offered.pop(key)()
            return True
        return self.fallback is not None and self.fallback(where, message)

    @contextmanager
    def active(self) -> Iterator[Reliefs]:
        """Collect the reliefs offered in this thread (or task) until the block ends."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)


_CURRENT: ContextVar[Reliefs | None] = ContextVar("diffblocks_reliefs", default=None)


def offer_relief(owner: object, relief: Callable[[], None]) -> bool:
    """Offer ``relief`` (something that makes the work that follows need less memory) to the step running now.

    Returns False when no step with a relief ladder is running (a component used on its own): the
    caller then runs its own work through :func:`run_relieved` with a :class:`Reliefs` of its own.
    """
    current = _CURRENT.get()
    if current is None:
        return False
    current.offer(owner, relief)
    return True


def run_relieved(fn: Callable[[], T], reliefs: Reliefs, *, where: str) -> T:
    """``fn()``; after each out-of-memory error, the next relief of ``reliefs`` and ``fn()`` again.

    ``fn`` must change nothing it reads before it returns (a block writes its outputs only then),
    so that running it again is the same as running it once.

    Raises:
        torch.OutOfMemoryError: no relief is left; the message names ``where``.

    Example:
        >>> sizes = [4, 2, 1]
        >>> def step() -> int:
        ...     if sizes[0] > 1:
        ...         raise torch.OutOfMemoryError("CUDA out of memory")
        ...     return sizes[0]
        >>> reliefs = Reliefs()
        >>> reliefs.offer("half", lambda: sizes.pop(0))
        >>> reliefs.offer("quarter", lambda: sizes.pop(0))
        >>> run_relieved(step, reliefs, where="denoise")
        1
    """
    while True:
        with reliefs.active():
            out = attempt(fn)
        if not isinstance(out, OutOfMemory):
            return out
        if not reliefs.relieve(where, out.message):
            raise torch.OutOfMemoryError(_MSG_NO_RELIEF.format(message=out.message, where=where))
