"""Out of memory during a call: free what the failed step held, tighten the plan, retry the step.

A pipeline step is a block: it reads its inputs from the run's state and writes its outputs back
only when it returns, so a step that runs out of memory has changed nothing and can run again.
Relief comes in two sizes, the cheapest first:

1. A guided step that batches its guidance passes runs them one by one for the rest of the call
   (:func:`~diffblocks.components.guiders.plain_predictions`): the same weights, half the
   activations, no extra traffic.
2. Then the manager's offload policy moves one rung down the planner's ladder
   (:data:`~diffblocks.components.memory.LADDER`: ``NoOffload`` -> ``ModelOffload`` ->
   ``GroupOffload`` -> ... -> ``LeafOffload``), and the step runs again. A warning says what changed.

Both go through :func:`attempt`, which catches the error and frees memory *after* the ``except``
block: inside it, the traceback would keep the failed forward's frames, and so its activations,
alive during the retry.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TypeVar

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
