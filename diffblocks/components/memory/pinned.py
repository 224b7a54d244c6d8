"""Homes for streamed groups: one page-locked CPU buffer per group, exactly its size, laid out as a device slot.

A streamed group is copied to the device again and again, so its home tensors live in pinned
(page-locked) memory, which the GPU reads by DMA without the host waiting. Pinning them one by
one with ``tensor.pin_memory()`` goes through PyTorch's pinned host allocator, which rounds
every allocation up to a power of two (a 72 MiB weight takes 128 MiB) and keeps what is freed
cached for later pinned allocations rather than giving it back; and it asks the driver for
fresh page-locked memory tensor by tensor, which made a first call under a cap take seconds per
GiB of weights.

So each group gets one buffer of its own, sized to the byte:

- anonymous memory mapped for it (page aligned, nothing allocated until written);
- its tensors copied in at the offsets a device slot gives them
  (:func:`~diffblocks.components.memory.slots.packed_bytes`), so the whole group then goes to
  the device as one copy instead of one per tensor;
- registered with the driver (``cudaHostRegister``), and unregistered when the last tensor
  viewing the buffer is freed, just before the memory is unmapped.

Tensors that are already the packed views of one buffer (a model attached again) keep it:
nothing is copied or registered twice.
"""

from __future__ import annotations

import mmap
import threading
import warnings
from collections.abc import Callable, Sequence

import torch

from diffblocks.components.memory.slots import packed_buffer, packed_views

Lock = Callable[[int, int], bool]
"""Page-lock ``size`` bytes at address ``ptr``; False if the driver refused."""
Unlock = Callable[[int], None]


_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every device's context, not only the current one's


def _cuda_lock(ptr: int, size: int) -> bool:
    return int(torch.cuda.cudart().cudaHostRegister(ptr, size, _PORTABLE)) == 0


def _cuda_unlock(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001 - at interpreter exit the driver may be gone before the last weight
        pass


_refused = threading.Event()  # warned once: every later group would be refused the same way


def locked_buffer(nbytes: int, *, lock: Lock = _cuda_lock, unlock: Unlock = _cuda_unlock) -> torch.Tensor:
    """A CPU byte tensor of exactly ``nbytes``, page-locked by ``lock`` until the last tensor viewing it is freed.

    If the driver refuses to lock it, the buffer stays pageable (copies from it are still correct,
    only slower: the driver stages them) and a warning says so, once.
    """
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    memory = _LockedMap(-1, nbytes)
    buffer = torch.frombuffer(memory, dtype=torch.uint8)  # holds the map until the last view of it is freed
    address = buffer.data_ptr()
    if lock(address, nbytes):
        memory.unlock = lambda: unlock(address)
    elif not _refused.is_set():
        _refused.set()
        warnings.warn("the driver refused to page-lock memory for offloaded weights: they are copied to the device "
                      "from pageable memory, which is slower", RuntimeWarning, stacklevel=3)
    return buffer


class _LockedMap(mmap.mmap):
    """Anonymous memory that unlocks itself when the last tensor viewing it lets go of it."""

    unlock: Callable[[], None] | None = None

    def __del__(self) -> None:  # runs before mmap's own deallocation unmaps the memory
        if self.unlock is not None:
            self.unlock()


Put = Callable[[int, torch.Tensor], None]
"""Told of each tensor's home as soon as it exists (index, home), so the caller can let go of the original."""


def pack(tensors: list[torch.Tensor], nbytes: int, put: Put, allocate: Callable[[int], torch.Tensor] = locked_buffer) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``tensors`` copied one by one into one buffer of ``nbytes`` (their ``packed_bytes``) from ``allocate``: the views, and the buffer.

    Each entry of ``tensors`` is replaced by its view as soon as it is copied, and ``put`` is told,
    so an original no one else holds is freed before the next is copied: packing a model needs
    about its largest tensor beside it, not a second model. Tensors that are already the packed
    views of one whole buffer are kept as they are, with that buffer.
    """
    found = packed_buffer(tensors, nbytes)
    if found is not None:
        return list(tensors), found
    buffer = allocate(nbytes)
    for i, view in enumerate(packed_views(buffer, tensors)):
        view.copy_(tensors[i])
        tensors[i] = view
        put(i, view)
    return tensors, buffer
