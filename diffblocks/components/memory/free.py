"""Budgets measured from the machine: ``memory_budget="auto"`` and ``cpu_memory_budget="auto"``.

The budget is what the device (or the CPU) has free when the manager is made, less a margin:
:data:`SHARE` of it, as accelerate's ``get_balanced_memory`` leaves for a GPU. The rest is for
what no plan counts: the CUDA context and the libraries' workspaces, the caching allocator's
rounding, and other programs. It is measured once: a budget that followed free memory would
shrink under the manager's own models. Measured again later (``manager.place(memory_budget="auto")``),
what the manager's loaded models hold there counts as free (:func:`own_bytes`): they are what
the budget is for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from diffblocks.components.memory.disk import is_mapped
from diffblocks.components.memory.mover import tensors_of
from diffblocks.components.memory.reserve import held_bytes
from diffblocks.components.memory.sizes import ByteSize

SHARE = 0.9
"""The part of the free memory an ``"auto"`` budget takes."""


def _free_cuda(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def _free_cpu(_device: torch.device) -> int:
    import psutil  # accelerate's dependency, and so ours

    return int(psutil.virtual_memory().available)


def _free_mps(_device: torch.device) -> int:
    return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())


FREE: dict[str, Callable[[torch.device], int]] = {"cuda": _free_cuda, "cpu": _free_cpu, "mps": _free_mps}
"""How free memory is read, per device type."""


def is_auto(value: object) -> bool:
    """Whether a budget was given as ``"auto"`` (any case)."""
    return isinstance(value, str) and value.strip().lower() == "auto"


def own_bytes(models: Iterable[nn.Module], device: torch.device) -> int:
    """Bytes ``models`` hold in memory on ``device`` now, each storage once (a memory-mapped model holds none: its pages are cache)."""
    index = device.index or 0
    # detached: a parameter as the plain tensor over its storage, so a model met twice counts once
    return held_bytes(t.detach() for model in models if not is_mapped(model) for t in tensors_of(model, recurse=True)
                      if t.device.type == device.type and (t.device.index or 0) == index)


def measured_budget(device: torch.device, *, held: int = 0) -> ByteSize:
    """:data:`SHARE` of the memory free on ``device`` now, counting ``held`` bytes (the asker's own tensors there) as free.

    Raises:
        ValueError: a device whose free memory cannot be read (give the budget as a size instead).

    Example:
        >>> 0 < measured_budget(torch.device("cpu")) and is_auto("auto") and not is_auto("12GiB")
        True
    """
    read = FREE.get(device.type)
    if read is None:
        raise ValueError(f"memory budget 'auto' cannot read the free memory of {device}: give the budget as a size ('12GiB')")
    return ByteSize(int((read(device) + held) * SHARE))


__all__ = ["FREE", "SHARE", "is_auto", "measured_budget", "own_bytes"]
