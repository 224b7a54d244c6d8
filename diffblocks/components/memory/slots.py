"""Device buffers that streamed groups are copied into, the same few reused group after group.

Group offload copies the same groups in every step. Copied into tensors from the caching
allocator, each group's weights are allocated on the side stream and freed after the compute
stream has read them; under a memory cap the allocator then runs out of blocks it may hand back
yet, and on each such miss it synchronizes the device and returns its whole cache to the driver
(``num_alloc_retries`` in ``torch.cuda.memory_stats()``), which stalls the very overlap streaming
relies on. Measured on Flux.1-dev under a 12 GiB cap: about 600 such retries in three calls.

So a group is copied into a **slot**: one flat byte buffer on the device, allocated once and sized
to the largest group, with each tensor a view at an aligned offset. Two slots are enough for the
group running and the one fetched ahead. A slot is handed back when its group goes home, with an
event recorded on the compute stream after the group's last kernel; the next copy into that slot
waits for the event on the side stream (a wait on the GPU, not the host), so no copy overwrites
weights a queued kernel has yet to read.

Two things this asks of the code that runs a group: it runs on the device's current stream in the
thread that fetched the group (the mark is recorded there), and it keeps no view of a group's
weights past the group's last layer (a cached ``weight.t()``): the next copy writes over it.
Our models do neither; the stream of a call is the default one.

A group whose tensors cannot be views of bytes (a quantized tensor subclass, a strided tensor)
or that finds every slot taken (calls in several threads running several groups at once) is
copied into tensors of its own from the allocator, as before: correct, only not planned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, final

import torch

ALIGN = 256
"""Bytes each tensor's offset in a slot is a multiple of (what CUDA's allocator aligns to; every dtype's size divides it)."""


def packed_bytes(tensors: Sequence[torch.Tensor]) -> int | None:
    """The bytes ``tensors`` take packed into one slot, each at an aligned offset (None: one of them cannot be a view of bytes)."""
    total = 0
    for tensor in tensors:
        if type(tensor) is not torch.Tensor or not tensor.is_contiguous():
            return None
        total += _aligned(tensor.numel() * tensor.element_size())
    return total


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def packed_views(buffer: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A view of the byte tensor ``buffer`` for each of ``tensors`` (same shape and dtype), packed from its start at aligned offsets."""
    views, offset = [], 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        views.append(buffer[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape))
        offset += _aligned(nbytes)
    return views


Runs = list[tuple[int, torch.Tensor]]
"""Where stretches of a group's home bytes go in a slot: (offset in the slot, the bytes to copy there)."""


def packed_runs(tensors: Sequence[torch.Tensor]) -> Runs | None:
    """``tensors`` as the few copies that fill a slot laid out by :func:`packed_views` (None: one cannot be a view of bytes).

    Consecutive tensors that lie in one storage as a slot lays them out (each the next aligned
    offset after the last) are one run, copied at once: a group packed into one buffer is one run,
    wherever the buffer holds it (a group of blocks inside a model packed whole, one layer's tensors
    inside its block's buffer); a group of blocks packed one by one is a run per block.
    """
    runs: list[tuple[int, torch.UntypedStorage, int, int]] = []  # slot offset, storage, its byte offset, bytes
    offset, after = 0, -1  # the slot's next offset; where in the last run's storage the next tensor would be
    for tensor in tensors:
        if type(tensor) is not torch.Tensor or not tensor.is_contiguous():
            return None
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:  # takes no room in the slot either
            continue
        storage, at = tensor.untyped_storage(), tensor.storage_offset() * tensor.element_size()
        if runs and at == after and storage.data_ptr() == runs[-1][1].data_ptr():
            start, _, first, _ = runs[-1]
            runs[-1] = (start, storage, first, offset + nbytes - start)
        else:
            runs.append((offset, storage, at, nbytes))
        offset, after = offset + _aligned(nbytes), at + _aligned(nbytes)
    return [(start, torch.empty(0, dtype=torch.uint8).set_(storage)[first : first + nbytes]) for start, storage, first, nbytes in runs]


class Mark(Protocol):
    """A point in the compute stream's queue (a ``torch.cuda.Event`` recorded there)."""

    def synchronize(self) -> None: ...


def cuda_mark(device: torch.device) -> Mark:
    """An event recorded on ``device``'s current stream now: what the side stream waits for before writing a slot."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


@final
class Slot:
    """One device buffer, the mark its last reader's kernels end at, and the mark its last copy ends at."""

    __slots__ = ("buffer", "busy", "free_after", "written")

    def __init__(self, buffer: torch.Tensor, free_after: Mark) -> None:
        self.buffer = buffer
        self.busy = False
        self.free_after = free_after
        self.written: Mark | None = None  # set by the copy into it (a group fetched ahead and dropped may never be waited for)

    def views(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """A view of this slot for each of ``tensors`` (same shape and dtype), packed from the start."""
        return packed_views(self.buffer, tensors)


@final
class DeviceSlots:
    """At most ``count`` slots on ``device``, made and grown as groups need them.

    Args:
        device: a CUDA device.
        count: slots kept (two: the group running and the one fetched ahead).
        mark: a mark on the compute stream now (default :func:`cuda_mark`; tests pass a stand-in).
    """

    def __init__(self, device: torch.device, count: int = 2, *, mark: Callable[[torch.device], Mark] = cuda_mark) -> None:
        self.device, self.count, self.mark = device, count, mark
        self.slots: list[Slot] = []

    def take(self, nbytes: int) -> Slot | None:
        """A free slot of at least ``nbytes``, marked busy (None: all are busy).

        The smallest free slot that is large enough; else a new one while fewer than ``count``
        exist; else the largest free one, grown.
        """
        free = [slot for slot in self.slots if not slot.busy]
        fitting = [slot for slot in free if slot.buffer.numel() >= nbytes]
        if fitting:
            slot = min(fitting, key=lambda each: each.buffer.numel())
        elif len(self.slots) < self.count:
            slot = Slot(*self._allocate(nbytes))
            self.slots.append(slot)
        elif free:
            slot = max(free, key=lambda each: each.buffer.numel())
            # its old buffer goes back to the allocator: no kernel may still read it, no copy still write it
            slot.free_after.synchronize()
            if slot.written is not None:
                slot.written.synchronize()
            del slot.buffer
            try:
                slot.buffer, slot.free_after = self._allocate(nbytes)
            except BaseException:  # out of memory: the slot is gone, not left without a buffer
                self.slots.remove(slot)
                raise
            slot.written = None
        else:
            return None
        slot.busy = True
        return slot

    def give_back(self, slot: Slot) -> None:
        """``slot``'s group has gone home: the next copy into it waits for the kernels queued until now."""
        slot.free_after, slot.busy = self.mark(self.device), False

    @property
    def nbytes(self) -> int:
        return sum(slot.buffer.numel() for slot in self.slots)

    def clear(self) -> None:
        """Give every slot's memory back to the allocator (the caller has synchronized the copies into them)."""
        for slot in self.slots:
            slot.free_after.synchronize()
            if slot.written is not None:
                slot.written.synchronize()
        self.slots.clear()

    def _allocate(self, nbytes: int) -> tuple[torch.Tensor, Mark]:
        # allocated on the compute stream, whose queued kernels may still use the memory's last tenant:
        # the side stream writes into it only after a mark made here
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return buffer, self.mark(self.device)
