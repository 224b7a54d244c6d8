"""What a component costs in memory: the bytes it holds on each device, and what it would hold unquantized."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, final

import torch
from torch import Tensor, nn

from diffblocks.components.quantizers.base import quantizer_of
from diffblocks.components.quantizers.gguf import GGUFLinear


@final
@dataclass(frozen=True)
class ComponentMemory:
    """One component's memory.

    Attributes:
        name: the component's name in the pipeline.
        class_name: its class.
        quantizer: ``quantizer.describe()``, or None when it is not quantized.
        devices: bytes held on each device (``{"cpu": 1234}``).
        original_bytes: what its weights would hold unquantized, in the dtype they stand for.
    """

    name: str
    class_name: str
    quantizer: str | None
    devices: dict[str, int] = field(default_factory=dict)
    original_bytes: int = 0

    @property
    def bytes(self) -> int:
        """Bytes held on all devices together."""
        return sum(self.devices.values())

    @property
    def ratio(self) -> float:
        """``bytes / original_bytes`` (1.0 for an unquantized component or one without weights)."""
        return self.bytes / self.original_bytes if self.original_bytes else 1.0


def _stored(module: nn.Module) -> list[Tensor]:
    """The plain tensors that hold ``module``'s state, as its backend stores them."""
    quantizer = quantizer_of(module)
    if quantizer is not None and quantizer.quantizes_float_weights:  # GGUF's bytes are plain buffers already
        with torch.inference_mode(False):  # callable from inside a generation call: detaching subclasses needs it
            return list(quantizer.state_to_save(module)[0].values())
    return [*module.parameters(), *module.buffers()]


def _float_itemsize(module: nn.Module) -> int:
    """The item size of the module's plain floating-point tensors (what quantized weights stand in for)."""
    sizes = Counter(t.element_size() for t in (*module.parameters(), *module.buffers()) if type(t) in (Tensor, nn.Parameter) and t.is_floating_point())
    return sizes.most_common(1)[0][0] if sizes else 4


def _original(module: nn.Module) -> int:
    """Bytes the module's tensors would take unquantized."""
    float_size = _float_itemsize(module)
    total = 0
    for sub in module.modules():
        tensors = [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]
        for name, tensor in tensors:
            if isinstance(sub, GGUFLinear) and name == "weight":
                total += sub.in_features * sub.out_features * sub.compute_dtype.itemsize
                continue
            state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit: packed bytes, logical shape in the state
            if state is not None and getattr(state, "shape", None) is not None:
                total += math.prod(state.shape) * state.dtype.itemsize
            elif tensor.is_floating_point():  # plain, or a tensor subclass that reports the dtype it stands for
                total += tensor.numel() * (tensor.element_size() if type(tensor) in (Tensor, nn.Parameter) else tensor.dtype.itemsize)
            elif tensor.dtype in (torch.int8, torch.uint8) and name == "weight":  # int8 rows (bitsandbytes)
                total += tensor.numel() * float_size
            else:
                total += tensor.numel() * tensor.element_size()
    return total


def component_memory(name: str, component: Any) -> ComponentMemory:
    """The memory of ``component`` (anything: components without tensors cost nothing)."""
    if not isinstance(component, nn.Module):
        return ComponentMemory(name, type(component).__name__, None)
    devices: Counter[str] = Counter()
    for tensor in _stored(component):
        devices[str(tensor.device)] += tensor.numel() * tensor.element_size()
    quantizer = quantizer_of(component)
    original = _original(component) if quantizer is not None else sum(devices.values())
    return ComponentMemory(name, type(component).__name__, quantizer.describe() if quantizer else None, dict(devices), original)


def format_memory(rows: list[ComponentMemory]) -> str:
    """A table of :func:`component_memory` rows, in MiB."""
    lines = [f"{'component':<16} {'class':<28} {'MiB':>9} {'unquantized':>11}  {'devices':<18} quantizer"]
    for row in rows:
        places = ", ".join(f"{device}:{size / 2**20:.1f}" for device, size in row.devices.items()) or "-"
        lines.append(
            f"{row.name:<16} {row.class_name:<28} {row.bytes / 2**20:9.2f} {row.original_bytes / 2**20:11.2f}  {places:<18} "
            f"{row.quantizer or '-'}"
        )
    return "\n".join(lines)


__all__ = ["ComponentMemory", "component_memory", "format_memory"]
