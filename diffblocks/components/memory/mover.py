"""The mover: the one place a manager's offload policies move tensors between the device and their home.

One :class:`Mover` per manager knows the device, the home (the CPU), which models are resident, and
whom to tell about each move (tests count them there). Calls in several threads may share its
models, so it counts what each thread's running forward reads (:meth:`Mover.pin`), and a model
moves home only when no call uses it any more.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, final

import torch
from torch import nn

from diffblocks.components.memory.streams import Synchronous, streams_for

if TYPE_CHECKING:
    from diffblocks.components.memory.kept import KeptGroups
    from diffblocks.components.memory.streams import Prefetcher, StreamedGroup

OnMove = Callable[[str, torch.device, int], None]
"""Told of each move: the moved module's name (``"unet/down_blocks.0"``), where to, and the bytes moved."""


@final
class Mover:
    """Moves modules' tensors between the device and home, for all models of one manager.

    Args:
        device: where models run.
        home: where they wait (default: the CPU).
        on_move: called once per move (see :data:`OnMove`).
        streams: how streamed groups are copied (default: a side stream on CUDA, plain copies elsewhere;
            tests pass a stand-in that records the copies and waits).
    """

    def __init__(
        self,
        device: torch.device | str,
        *,
        home: torch.device | str = "cpu",
        on_move: OnMove | None = None,
        streams: Synchronous | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.home = torch.device(home)
        self.on_move = on_move
        self.streams = streams if streams is not None else streams_for(self.device)
        # the models ModelOffload placed on the device, each as one group: one, or more while one call
        # runs a model inside another's forward (it cannot wait for itself)
        self.resident: dict[nn.Module, StreamedGroup] = {}
        self.users: dict[int, int] = {}  # id(model) -> threads whose forwards run it now: it stays on the device
        self.prefetching: Prefetcher | None = None  # the model whose next group is being fetched ahead
        self.keep: dict[str, int] = {}  # bytes of each model's repeated blocks that GroupOffload keeps on the device (the plan's ``kept``)
        self.kept: dict[nn.Module, KeptGroups] = {}  # those blocks, by model, once attached: lent by make_room
        # Hooks of models run by concurrent calls check and change ``resident`` and the prefetch state together.
        self.lock = threading.RLock()
        self.freed = threading.Condition(self.lock)  # notified when a model is no longer in use
        self._pins = threading.local()  # this thread's own count per model, so a forward never waits for itself

    def held(self) -> dict[int, int]:
        """This thread's pins: id(model) -> forwards (and layers) of it running in this thread now."""
        pins: dict[int, int] | None = getattr(self._pins, "count", None)
        if pins is None:
            pins = self._pins.count = {}
        return pins

    def pin(self, model: object, bring: Callable[[bool], None] | None = None) -> None:
        """Count a use of ``model`` (a model, or what stands for a layer's tensors) in this thread; the first one, under the lock, runs ``bring`` first.

        ``bring(holding)`` puts the model on the device (``holding``: this thread uses other models
        too, so it must not wait for them). While a model is pinned by any thread it does not move.
        """
        pins, key = self.held(), id(model)
        count = pins.get(key, 0)
        if count:  # this thread runs it already: it cannot have moved
            pins[key] = count + 1
            return
        with self.lock:
            if bring is not None:
                bring(bool(pins))
            self.users[key] = self.users.get(key, 0) + 1
        pins[key] = 1

    def unpin(self, model: object) -> None:
        """End one use of ``model`` in this thread (nothing if this thread did not pin it: its pin failed)."""
        pins, key = self.held(), id(model)
        count = pins.get(key, 0)
        if count > 1:
            pins[key] = count - 1
        elif count == 1:
            del pins[key]
            with self.lock:
                left = self.users.get(key, 0) - 1
                if left > 0:
                    self.users[key] = left
                else:
                    self.users.pop(key, None)
                    self.freed.notify_all()

    def wait_unused(self, model: nn.Module) -> None:
        """Return once no other thread runs ``model`` (call with the lock held; this thread's own uses do not count)."""
        while self.users.get(id(model), 0) > self.held().get(id(model), 0):
            self.freed.wait()

    def make_room(self, nbytes: int, *, asking: object = None) -> int:
        """Lend up to ``nbytes`` of kept blocks of models no call is running (not ``asking``'s own); returns the bytes freed.

        See :mod:`~diffblocks.components.memory.kept`: the lent blocks come back at their model's next forward.
        """
        freed = 0
        with self.lock:
            for model, kept in list(self.kept.items()):
                if freed >= nbytes:
                    break
                if model is not asking and not self.users.get(id(model)):
                    freed += kept.lend(nbytes - freed)
        return freed

    def report(self, name: str, device: torch.device, nbytes: int) -> None:
        """Tell ``on_move`` of ``nbytes`` of ``name`` moved to ``device`` (by a move made elsewhere: a group's copy)."""
        if self.on_move is not None:
            self.on_move(name, device, nbytes)

    def move(self, name: str, modules: Iterable[nn.Module], device: torch.device, *, recurse: bool = True) -> None:
        moved = 0
        # Copies to the accelerator may overlap; copies home may not, since a later copy back would read a half-written buffer.
        overlap = device.type != "cpu"
        # Out of inference mode, so that moved parameters stay ordinary tensors that a later call with grad can use.
        with torch.inference_mode(False), torch.no_grad():
            for module in modules:
                moved += sum(t.numel() * t.element_size() for t in tensors_of(module, recurse=recurse))
                module._apply(lambda t: t.to(device, non_blocking=overlap), recurse=recurse)  # noqa: SLF001 - what nn.Module.to calls, one level deep when asked
        self.report(name, device, moved)


def tensors_of(module: nn.Module, *, recurse: bool) -> Iterable[torch.Tensor]:
    """The tensors that move with ``module``: its parameters and buffers."""
    yield from module.parameters(recurse=recurse)
    yield from module.buffers(recurse=recurse)
