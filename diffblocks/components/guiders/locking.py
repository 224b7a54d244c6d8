"""Per-model locks that keep a perturbed pass apart from every other guided forward of the same model.

A perturbation's hooks live on the shared model while its pass runs, so a forward started in
another thread at that moment would be perturbed too. :func:`guided_prediction` therefore runs
plain passes under a shared hold and perturbed passes under an exclusive one: plain passes of
several threads still overlap, a perturbed pass runs alone.
"""

from __future__ import annotations

import threading
from typing import final
from weakref import WeakKeyDictionary

from torch import nn


@final
class ModelLock:
    """A readers-writer lock: any number of plain forwards, or one perturbed forward alone.

    Waiting perturbed passes go before new plain ones, so a stream of plain passes from other
    threads cannot starve them. Not re-entrant: a thread holds it once at a time.
    """

    __slots__ = ("_changed", "_perturbed", "_plain", "_waiting")

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._plain = 0
        self._perturbed = False
        self._waiting = 0

    def acquire_plain(self) -> None:
        """Hold before an unperturbed forward; pair with :meth:`release_plain`."""
        with self._changed:
            while self._perturbed or self._waiting:
                self._changed.wait()
            self._plain += 1

    def release_plain(self) -> None:
        with self._changed:
            self._plain -= 1
            if not self._plain and self._waiting:
                self._changed.notify_all()

    def acquire_perturbed(self) -> None:
        """Hold before injecting a perturbation; pair with :meth:`release_perturbed` after ejecting it."""
        with self._changed:
            self._waiting += 1
            try:
                while self._perturbed or self._plain:
                    self._changed.wait()
            finally:
                self._waiting -= 1
            self._perturbed = True

    def release_perturbed(self) -> None:
        with self._changed:
            self._perturbed = False
            self._changed.notify_all()


_LOCKS: WeakKeyDictionary[nn.Module, ModelLock] = WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> ModelLock:
    """The one lock of ``model`` (made on first use, dropped with the model)."""
    found = _LOCKS.get(model)
    if found is None:
        with _LOCKS_GUARD:
            found = _LOCKS.setdefault(model, ModelLock())
    return found


__all__ = ["ModelLock", "model_lock"]
