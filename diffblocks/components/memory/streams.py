"""Streaming groups of a model's tensors to the accelerator: pinned at home, copied ahead on a side stream.

Group offload moves the same groups in the same order every step, so three things make it cheap:

- Each group's home tensors live in pinned (page-locked) CPU memory, pinned once when the policy
  is attached, packed into one buffer per group (:mod:`~diffblocks.components.memory.pinned`).
  A copy from pinned memory is a DMA the host does not wait for; from pageable memory the driver
  stages it through a pinned buffer of its own, synchronously. Tensors pinned already are left
  where they are; a group goes to the device as one copy per run of its tensors that lie side by
  side (:func:`~diffblocks.components.memory.slots.packed_runs`), one for a group packed whole.
- While group k computes on the current stream, group k+1 is copied on a side stream, into one
  of two device buffers reused group after group (:mod:`~diffblocks.components.memory.slots`).
  The current stream waits for the copy's event before group k+1's first kernel (a wait on the
  GPU, not the host), so no kernel reads a half-copied weight; a copy into a buffer waits for the
  kernels that read its last group, so none reads a half-overwritten one.
- Sending a group home copies nothing: its pinned home tensors are still there, and the device
  copies are dropped. A weight changed in place while on the device (its version counter moved)
  is copied back first.

The order to prefetch in is learned as the groups run (each group remembers which ran after it),
since definition order is not execution order (a UNet's mid block is defined after its up
blocks); the first call fetches each group when it is needed. Off CUDA, :class:`Synchronous` runs
the same code with no stream: each copy is complete when it returns.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, final

import torch
from torch import nn

from diffblocks.components.memory.pinned import Put, group_home, read_until
from diffblocks.components.memory.slots import DeviceSlots, Runs, Slot, packed_bytes

if TYPE_CHECKING:
    from diffblocks.components.memory.mover import Mover


class Synchronous:
    """Copies that are complete when they return (the CPU, the meta device): no pinning, no events.

    Also the base of test stand-ins that record the order of copies and waits.
    """

    def __init__(self, device: torch.device, *, non_blocking: bool = False) -> None:
        self.device, self.non_blocking = device, non_blocking

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as the home copy to stream from (pinned where that helps)."""
        return tensor

    def home(self, tensors: list[torch.Tensor], put: Put) -> tuple[list[torch.Tensor], Runs | None]:
        """A group's home copies to stream from, and the runs of bytes they lie in (None: copied tensor by tensor).

        Each home is given to ``put`` as soon as it exists, and replaces its original in ``tensors``.
        """
        for i, tensor in enumerate(tensors):
            tensors[i] = self.pin(tensor)
            put(i, tensors[i])
        return tensors, None

    def copy(self, label: str, tensors: list[torch.Tensor], runs: Runs | None = None) -> tuple[list[torch.Tensor], Any]:
        """Start copying ``tensors`` (lying in ``runs``, if given) to the device; returns the copies and what to wait on before using them."""
        return [t.to(self.device, non_blocking=self.non_blocking) for t in tensors], None

    def kept(self) -> Synchronous:
        """How groups that stay on the device are copied: on the current stream, into tensors of their own.

        They are fetched rarely (when attached, and after lending their memory), so nothing is
        gained by overlapping; and memory allocated on the current stream is memory that the
        current stream's work (a VAE decode) can reuse once they are released.
        """
        return self

    def wait(self, label: str, ready: Any) -> None:
        """Make work queued after this call see the copies complete."""

    def done(self, label: str, ready: Any) -> None:
        """The copies ``ready`` stands for are dropped (their group went home): their memory may be reused."""

    def clear(self) -> None:
        """No group is on the device any more: give back what was kept for copying into."""


@final
class CudaStreams(Synchronous):
    """Copies on one side stream per device, from pinned memory into reused slots, waited for by events on the current stream.

    A group is copied into one of two device buffers kept for streaming (:mod:`~diffblocks.components.memory.slots`),
    not into tensors of the caching allocator, so streaming under a memory cap neither fragments
    the allocator's memory nor makes it synchronize to find room.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.side = torch.cuda.Stream(device)
        self.slots = DeviceSlots(device)

    def kept(self) -> Synchronous:
        return _PinnedCopies(self)

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "cpu" or tensor.is_pinned():
            return tensor
        try:
            return tensor.pin_memory()
        except (RuntimeError, NotImplementedError):  # a tensor subclass without pin_memory: copied from pageable memory, still correct
            return tensor

    def home(self, tensors: list[torch.Tensor], put: Put) -> tuple[list[torch.Tensor], Runs | None]:
        if packed_bytes(tensors) is None or any(t.device.type != "cpu" for t in tensors):
            return super().home(tensors, put)
        return group_home(tensors, put)

    def copy(self, label: str, tensors: list[torch.Tensor], runs: Runs | None = None) -> tuple[list[torch.Tensor], Any]:
        current = torch.cuda.current_stream(self.device)
        nbytes = packed_bytes(tensors)
        slot = self.slots.take(nbytes) if nbytes is not None else None
        with torch.cuda.stream(self.side):
            if slot is None:  # tensors of their own, from the allocator
                copies = [t.to(self.device, non_blocking=True) for t in tensors]
            else:
                self.side.wait_event(slot.free_after)  # type: ignore[arg-type] - a cuda_mark: an event
                copies = slot.views(tensors)
                if runs is not None:  # the slot's layout is the runs': a copy per run, one for a group packed whole
                    for start, source in runs:
                        slot.buffer[start : start + source.numel()].copy_(source, non_blocking=True)
                else:
                    for copy, tensor in zip(copies, tensors):
                        copy.copy_(tensor, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.side)
        for _, source in runs or ():
            read_until(source, ready)
        if slot is not None:
            slot.written = ready
        if slot is None:
            for each in copies:
                each.record_stream(current)  # allocated on the side stream, read on the current one
        return copies, _Ticket(ready, slot)

    def wait(self, label: str, ready: Any) -> None:
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready.copied)

    def done(self, label: str, ready: Any) -> None:
        if ready is not None and ready.slot is not None:
            self.slots.give_back(ready.slot)

    def clear(self) -> None:
        self.side.synchronize()
        self.slots.clear()


@final
class _PinnedCopies(Synchronous):
    """Copies queued on the current stream from pinned homes (pinned as :class:`CudaStreams` pins them)."""

    def __init__(self, streams: CudaStreams) -> None:
        super().__init__(streams.device, non_blocking=True)
        self.pin, self.home = streams.pin, streams.home  # type: ignore[method-assign]

    def copy(self, label: str, tensors: list[torch.Tensor], runs: Runs | None = None) -> tuple[list[torch.Tensor], Any]:
        copies, ready = super().copy(label, tensors)
        if runs:  # the home buffers are not freed under these copies
            read = torch.cuda.Event()
            read.record(torch.cuda.current_stream(self.device))
            for _, source in runs:
                read_until(source, read)
        return copies, ready


@final
class _Ticket:
    """A copy in flight: the event it ends at, and the slot it fills (None: tensors of its own)."""

    __slots__ = ("copied", "slot")

    def __init__(self, copied: torch.cuda.Event, slot: Slot | None) -> None:
        self.copied, self.slot = copied, slot


def streams_for(device: torch.device) -> Synchronous:
    """:class:`CudaStreams` on a CUDA device, :class:`Synchronous` elsewhere."""
    return CudaStreams(device) if device.type == "cuda" else Synchronous(device)


@final
class StreamedGroup:
    """One group's tensors (``modules``' own, or all of theirs with ``recurse``): pinned at home, fetched and released.

    While fetched, the modules hold the device copies (the same ``nn.Parameter`` objects, their
    ``.data`` swapped, so anything holding a parameter still holds it); released, they hold the
    pinned home tensors again.
    """

    def __init__(self, label: str, modules: Iterable[nn.Module], streams: Synchronous, *, recurse: bool = True) -> None:
        self.label, self.streams = label, streams
        self.slots: list[tuple[nn.Module, str, bool]] = []  # (module, name, is a parameter)
        seen: set[int] = set()  # a parameter tied into two modules of the group moves once
        for module in modules:
            for sub in module.modules() if recurse else (module,):
                for name, param in sub._parameters.items():  # noqa: SLF001 - the slots nn.Module.to fills
                    if param is not None and id(param) not in seen:
                        seen.add(id(param))
                        self.slots.append((sub, name, True))
                for name, buffer in sub._buffers.items():  # noqa: SLF001
                    if buffer is not None:
                        self.slots.append((sub, name, False))
        with torch.inference_mode(False), torch.no_grad():
            self._rehome([self._get(slot) for slot in self.slots])
        self.fetched: list[torch.Tensor] | None = None
        self.ready: Any = None  # what the streams returned for the copy in flight or done
        self._waited = False
        self.users = 0  # calls running the group now (in any thread): it is not released under them
        self._versions: list[int] = []

    def fetch(self) -> bool:
        """Start copying the group to the device (nothing if it is there already); True if a copy started."""
        if self.fetched is not None:
            return False
        with torch.inference_mode(False), torch.no_grad():
            currents = [self._get(slot) for slot in self.slots]
            if any(_replaced(current, home) for current, home in zip(currents, self.home)):
                # model.to(dtype) or a new weight since: that is home now (pinned as the streams pin)
                self._rehome([current.to(home.device) for current, home in zip(currents, self.home)])
            # runs are given only for homes the streams laid out themselves (a stand-in's copy need not take them)
            self.fetched, self.ready = (self.streams.copy(self.label, self.home) if self.runs is None
                                        else self.streams.copy(self.label, self.home, self.runs))
            self._waited = False
            self._put(self.fetched)
        self._versions = [self._version(slot) for slot in self.slots]
        return True

    def wait(self) -> None:
        """Queue nothing that reads the group before its copy is complete (call before its first layer runs)."""
        if not self._waited:
            self.streams.wait(self.label, self.ready)
            self._waited = True

    def release(self) -> bool:
        """Put the home tensors back (copying back any changed in place); True if the group was on the device."""
        if self.fetched is None:
            return False
        with torch.inference_mode(False), torch.no_grad():
            homes, replaced = list(self.home), False
            for i, (slot, home, fetched, version) in enumerate(zip(self.slots, self.home, self.fetched, self._versions)):
                current = self._get(slot)
                if _replaced(current, fetched):  # replaced on the device (model.to(dtype) while running): keep the new one
                    homes[i], replaced = current.to(home.device), True
                elif fetched is not home and self._version(slot) != version:
                    home.copy_(fetched)
            if replaced:
                self._rehome(homes)
            else:
                self._put(self.home)
        self.streams.done(self.label, self.ready)
        self.fetched, self.ready = None, None
        return True

    def _rehome(self, tensors: list[torch.Tensor]) -> None:
        """Make ``tensors`` (on the home device) the group's home, as the streams keep it, each put in its slot."""
        self.home, self.runs = self.streams.home(tensors, lambda i, home: self._put_one(self.slots[i], home))
        self.nbytes = sum(t.numel() * t.element_size() for t in self.home)

    def _get(self, slot: tuple[nn.Module, str, bool]) -> torch.Tensor:
        module, name, is_param = slot
        tensor = module._parameters[name] if is_param else module._buffers[name]  # noqa: SLF001
        assert tensor is not None
        return tensor.data if is_param else tensor

    def _version(self, slot: tuple[nn.Module, str, bool]) -> int:
        module, name, is_param = slot
        tensor = module._parameters[name] if is_param else module._buffers[name]  # noqa: SLF001
        assert tensor is not None
        return tensor._version  # noqa: SLF001 - bumped by every in-place change

    def _put(self, tensors: list[torch.Tensor]) -> None:
        for slot, tensor in zip(self.slots, tensors):
            self._put_one(slot, tensor)

    @staticmethod
    def _put_one(slot: tuple[nn.Module, str, bool], tensor: torch.Tensor) -> None:
        module, name, is_param = slot
        if is_param:
            param = module._parameters[name]  # noqa: SLF001
            assert param is not None
            param.data = tensor
        else:
            module._buffers[name] = tensor  # noqa: SLF001


def _replaced(current: torch.Tensor, known: torch.Tensor) -> bool:
    """Whether a slot now holds another tensor than the one the group put there."""
    return current.dtype != known.dtype or current.device != known.device or current.data_ptr() != known.data_ptr()


@final
class Prefetcher:
    """The groups of one model, each fetched before it runs and the one that ran after it last time fetched ahead.

    At most two groups of all the models sharing ``mover`` are on the device at once: the one
    running and the one fetched ahead (a model that starts running drops another model's guess),
    so a policy that prefetches counts two groups in its peak. Calls in other threads running the
    same model add the groups they run, which stay until the last of them has run them: a group is
    released only when no thread is in it (each thread counts its own, :meth:`finish` ends them
    when a forward fails half-way).
    """

    def __init__(self, groups: list[StreamedGroup], mover: Mover, *, prefetch: bool = True) -> None:
        self.groups, self.mover, self.prefetch = groups, mover, prefetch
        self._after: dict[int, StreamedGroup] = {}  # id(group) -> the group that ran after it last time
        self._last: StreamedGroup | None = None
        self._ahead: StreamedGroup | None = None
        self._mine = threading.local()  # the groups this thread has entered and not left

    def _held(self) -> list[StreamedGroup]:
        held: list[StreamedGroup] | None = getattr(self._mine, "groups", None)
        if held is None:
            held = self._mine.groups = []
        return held

    def enter(self, group: StreamedGroup) -> None:
        """``group`` is about to run: make sure it is there, then start fetching the group expected next."""
        with self.mover.lock:
            self._enter(group)
            held = self._held()
            if not any(each is group for each in held):  # entered again after a failed run: counted once
                group.users += 1
                held.append(group)

    def _enter(self, group: StreamedGroup) -> None:
        if self._last is not None and self._last is not group:
            self._after[id(self._last)] = group
        self._last = group
        if self.mover.prefetching is not None and self.mover.prefetching is not self:
            self.mover.prefetching.drop_ahead()
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead is not group:
            self._release(ahead)  # a wrong guess: its memory is not counted beside the next one's
        if group.fetch():
            self.moved(group, self.mover.device)
        group.wait()
        following = self._after.get(id(group)) if self.prefetch else None
        if following is not None and following is not group and following.fetch():
            self.moved(following, self.mover.device)
            self._ahead, self.mover.prefetching = following, self

    def leave(self, group: StreamedGroup) -> None:
        """``group`` has run: its device copies are dropped, unless a call in another thread is running it."""
        with self.mover.lock:
            self._done(group)

    def finish(self) -> None:
        """The model's forward has ended in this thread (returned or failed): end this thread's groups too."""
        with self.mover.lock:
            for group in list(self._held()):
                self._done(group)

    def _done(self, group: StreamedGroup) -> None:
        held = self._held()
        for i, each in enumerate(held):
            if each is group:
                del held[i]
                group.users -= 1
                self._release(group)
                return

    def drop_ahead(self) -> None:
        """Release the group fetched ahead, if any (another model runs now)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            self._release(ahead)
        if self.mover.prefetching is self:
            self.mover.prefetching = None

    def release_all(self) -> None:
        self.drop_ahead()
        for group in self.groups:
            self._release(group)

    def _release(self, group: StreamedGroup) -> None:
        if group.users:  # a call is running it: the last one to leave releases it
            return
        if group.release():
            self.moved(group, self.mover.home)

    def moved(self, group: StreamedGroup, device: torch.device) -> None:
        """Tell the mover's ``on_move`` of ``group`` copied to ``device`` (or sent home)."""
        self.mover.report(group.label, device, group.nbytes)
