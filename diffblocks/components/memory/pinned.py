"""Homes for streamed groups: one page-locked CPU buffer per group, exactly its size, laid out as a device slot.

A streamed group is copied to the device again and again, so its home tensors live in pinned
(page-locked) memory, which the GPU reads by DMA without the host waiting. Pinning them one by
one with ``tensor.pin_memory()`` goes through PyTorch's pinned host allocator, which rounds
every allocation up to a power of two (a 72 MiB weight takes 128 MiB) and keeps what is freed
cached for later pinned allocations rather than giving it back; and it asks the driver for
fresh page-locked memory tensor by tensor, which made a first call under a cap take seconds per
GiB of weights.

So each group gets one buffer of its own, sized to the byte:

- anonymous memory mapped for it (page aligned, nothing allocated until written), in 2 MiB pages
  where the kernel gives transparent huge pages for the asking: locking a group and copying it in
  then took about half the time it took in 4 KiB pages (``bench/pinning_gpu.py`` on an H100 host);
- its tensors copied in at the offsets a device slot gives them
  (:func:`~diffblocks.components.memory.slots.packed_views`), so the whole group then goes to
  the device as one copy instead of one per tensor;
- page-locked with the driver (``cuMemHostRegister``), and unlocked when the last tensor viewing
  the buffer is freed, after the last copy read from it is complete and before the memory is
  unmapped.

The driver API rather than the runtime's ``cudaHostRegister``: a refusal from the runtime stays
behind as the thread's "last error", which PyTorch then raises at the next unrelated kernel
launch; the driver keeps no such state. A refusal leaves the buffer pageable (copies from it are
still correct, only staged by the driver) and warns once.

Tensors pinned already (a model attached again, or regrouped: a group of blocks inside a model
packed whole) keep their buffer, and are copied from where they lie
(:func:`~diffblocks.components.memory.slots.packed_runs`): nothing is copied or locked twice.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

from diffblocks.components.memory.slots import Runs, packed_bytes, packed_runs, packed_views

Lock = Callable[[int, int], bool]
"""Page-lock ``size`` bytes at address ``ptr``; False if the driver refused."""
Unlock = Callable[[int], None]

_PORTABLE = 1  # CU_MEMHOSTREGISTER_PORTABLE: locked for every device's context, not only the current one's
_driver: Any = None


def _libcuda() -> Any:
    global _driver
    if _driver is None:
        driver = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
        driver.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        driver.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
        _driver = driver
    return _driver


def _cuda_lock(ptr: int, size: int) -> bool:
    try:
        torch.cuda.current_stream().query()  # a runtime call: binds the device's context to this thread for the driver's
        driver = _libcuda()
    except (OSError, RuntimeError):
        return False
    return int(driver.cuMemHostRegister_v2(ptr, size, _PORTABLE)) == 0


def _cuda_unlock(ptr: int) -> None:
    try:
        torch.cuda.current_stream().query()
        driver = _libcuda()
    except Exception:  # noqa: BLE001 - at interpreter exit the driver may be gone before the last weight
        return
    driver.cuMemHostUnregister(ptr)  # an error (already gone) leaves no state behind in the driver API


HUGE_PAGES: int | None = getattr(mmap, "MADV_HUGEPAGE", None)
"""The advice asking for transparent huge pages (Linux); None: none is asked for."""

_warned = threading.Lock()
_refused = False  # warned once: every later group would be refused the same way


def locked_buffer(nbytes: int, *, lock: Lock = _cuda_lock, unlock: Unlock = _cuda_unlock) -> torch.Tensor:
    """A CPU byte tensor of exactly ``nbytes``, page-locked by ``lock`` until the last tensor viewing it is freed.

    If the driver refuses to lock it, the buffer stays pageable (copies from it are still correct,
    only slower: the driver stages them) and a warning says so, once.
    """
    global _refused
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    # private, as any other tensor's memory: a forked child's writes stay its own (Windows has no flags: private already)
    private = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_PRIVATE") else {}
    memory = _LockedMap(-1, nbytes, **private)
    if HUGE_PAGES is not None and nbytes >= 2**21:
        try:  # 2 MiB pages: the kernel faults and the driver locks 512 times fewer pages
            memory.madvise(HUGE_PAGES)
        except OSError:  # a kernel without transparent huge pages: 4 KiB pages, as without the advice
            pass
    buffer = torch.frombuffer(memory, dtype=torch.uint8)  # holds the map until the last view of it is freed
    address, pages = buffer.data_ptr(), -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    memory.unlock = lambda: unlock(address)  # set first: nothing can leave the range locked and forgotten
    if lock(address, pages):
        memory.address, _MAPS[address] = address, weakref.ref(memory)
        return buffer
    memory.unlock = None
    with _warned:
        warn, _refused = not _refused, True
    if warn:
        warnings.warn("the driver refused to page-lock memory for offloaded weights: they are copied to the device "
                      "from pageable memory, which is slower", RuntimeWarning, stacklevel=3)
    return buffer


class _LockedMap(mmap.mmap):
    """Anonymous memory that unlocks itself when the last tensor viewing it lets go of it."""

    unlock: Callable[[], None] | None = None
    address = 0
    last_read: Any = None  # a torch.cuda.Event after the last copy that reads from it

    def __del__(self) -> None:  # runs before mmap's own deallocation unmaps the memory
        if self.unlock is None:
            return
        _MAPS.pop(self.address, None)
        try:
            if self.last_read is not None:
                self.last_read.synchronize()  # a copy still reading it (a group fetched ahead, then dropped) ends first
        finally:
            self.unlock()


_MAPS: dict[int, weakref.ref[_LockedMap]] = {}  # address -> locked map, to mark the copies that read it


def read_until(buffer: torch.Tensor, event: Any) -> None:
    """A copy out of ``buffer`` (a locked buffer, or bytes of one) is queued to end at ``event``: its memory waits for it."""
    memory = _MAPS.get(buffer.untyped_storage().data_ptr())
    found = memory() if memory is not None else None
    if found is not None:
        found.last_read = event


Put = Callable[[int, torch.Tensor], None]
"""Told of each tensor's home as soon as it exists (index, home), so the caller can let go of the original."""


def pack(tensors: list[torch.Tensor], nbytes: int, put: Put, allocate: Callable[[int], torch.Tensor] = locked_buffer) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``tensors`` copied one by one into one buffer of ``nbytes`` (their ``packed_bytes``) from ``allocate``: the views, and the buffer.

    Each entry of ``tensors`` is replaced by its view as soon as it is copied, and ``put`` is told,
    so an original no one else holds is freed before the next is copied: packing a model needs
    about its largest tensor beside it, not a second model.
    """
    buffer = allocate(nbytes)
    for i, view in enumerate(packed_views(buffer, tensors)):
        view.copy_(tensors[i])
        tensors[i] = view
        put(i, view)
    return tensors, buffer


def group_home(
    tensors: list[torch.Tensor],
    put: Put,
    *,
    pinned: Callable[[torch.Tensor], bool] = torch.Tensor.is_pinned,
    allocate: Callable[[int], torch.Tensor] = locked_buffer,
) -> tuple[list[torch.Tensor], Runs | None]:
    """A streamed group's home: the tensors not ``pinned`` yet packed into one new buffer, the rest left where they are.

    Returns the homes (also put into ``tensors``, each given to ``put`` as it is made) and the runs
    that copy them into a slot (:func:`~diffblocks.components.memory.slots.packed_runs`): one for a
    group packed here whole; more where tensors were pinned already, say a group of blocks
    packed one by one before, or a weight tied into another group. Nothing is copied or locked twice.
    """
    fresh = [i for i, tensor in enumerate(tensors) if tensor.numel() and not pinned(tensor)]

    def placed(j: int, home: torch.Tensor) -> None:  # the original goes as soon as its home exists
        tensors[fresh[j]] = home
        put(fresh[j], home)

    if fresh:
        chosen = [tensors[i] for i in fresh]
        pack(chosen, packed_bytes(chosen) or 0, placed, allocate)
    return tensors, packed_runs(tensors)
