"""Budgets measured from the machine: ``memory_budget="auto"`` and ``cpu_memory_budget="auto"``.

The budget is what the device (or the CPU) has free when the manager is made, less a margin:
:data:`SHARE` of it, as accelerate's ``get_balanced_memory`` leaves for a GPU. The rest is for
what no plan counts: the CUDA context and the libraries' workspaces, the caching allocator's
rounding, and other programs. It is measured once: a budget that followed free memory would
shrink under the manager's own models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

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


def measured_budget(device: torch.device) -> ByteSize:
    """:data:`SHARE` of the memory free on ``device`` now.

    Raises:
        ValueError: a device whose free memory cannot be read (give the budget as a size instead).

    Example:
        >>> 0 < measured_budget(torch.device("cpu")) and is_auto("auto") and not is_auto("12GiB")
        True
    """
    read = FREE.get(device.type)
    if read is None:
        raise ValueError(f"memory budget 'auto' cannot read the free memory of {device}: give the budget as a size ('12GiB')")
    return ByteSize(int(read(device) * SHARE))


__all__ = ["FREE", "SHARE", "is_auto", "measured_budget"]
