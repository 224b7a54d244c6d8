"""The device to run on when none is given: the best accelerator this machine has, else the CPU."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch


def _cuda() -> bool:
    return torch.cuda.is_available()  # ROCm builds answer here too


def _npu() -> bool:
    # Ascend NPUs come from the torch_npu plugin, which adds torch.npu when imported; import it only if installed.
    if getattr(torch, "npu", None) is None and importlib.util.find_spec("torch_npu") is not None:
        importlib.import_module("torch_npu")
    return _backend_available(getattr(torch, "npu", None))


def _xpu() -> bool:
    return _backend_available(getattr(torch, "xpu", None))  # torch.xpu exists from torch 2.4 on


def _mps() -> bool:
    return torch.backends.mps.is_available()


def _backend_available(backend: object) -> bool:
    is_available = getattr(backend, "is_available", None)
    return callable(is_available) and bool(is_available())


PROBES: tuple[tuple[str, Callable[[], bool]], ...] = (("cuda", _cuda), ("npu", _npu), ("xpu", _xpu), ("mps", _mps))
"""Device types in the order PyTorch's own accelerator choice uses, each with its availability probe."""


def default_device() -> torch.device:
    """The first available of CUDA, NPU, XPU and MPS, else the CPU (see :func:`default_device_type`).

    Example:
        >>> import diffblocks
        >>> diffblocks.default_device().type in {"cuda", "npu", "xpu", "mps", "cpu"}
        True
    """
    return torch.device(default_device_type())


def default_device_type() -> str:
    """``"cuda"``, ``"npu"``, ``"xpu"`` or ``"mps"``: the first whose probe in :data:`PROBES` says yes, else ``"cpu"``.

    Each probe is guarded: a backend whose runtime is missing or broken (a driver that fails to
    initialise, a plugin that fails to import) counts as absent rather than failing the choice.
    """
    for device_type, available in PROBES:
        try:
            if available():
                return device_type
        except Exception:  # noqa: BLE001 - a broken backend is an absent one; the next is tried
            continue
    return "cpu"


__all__ = ["PROBES", "default_device", "default_device_type"]
