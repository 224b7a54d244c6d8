"""Devices: the one to run on when none is given (the best accelerator here, else the CPU), and checking a given one."""

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


def usable_device(device: torch.device | str) -> torch.device:
    """``device`` as a :class:`torch.device`, refused now if this machine cannot place tensors there.

    Without this check a pipeline built for ``"cuda"`` on a machine without CUDA fails only at its
    first call, deep inside a model.

    Raises:
        ValueError: not a device name, or its backend (CUDA, MPS) or index is not available here.
    """
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a device: {err}; use 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, but no GPU is visible"
            raise ValueError(f"device {device!r}: CUDA is not available on this machine (torch {torch.__version__}, {build}); use device='cpu'")
        count = torch.cuda.device_count()
        if target.index is not None and target.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if target.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS (Apple GPUs) is not available on this machine; use device='cpu'")
    return target


__all__ = ["PROBES", "default_device", "default_device_type", "usable_device"]
