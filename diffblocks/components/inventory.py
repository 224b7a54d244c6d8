"""What a ComponentsManager holds, one row per component: loaded or not, where, in what dtype, how big."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from diffblocks.components.specs import ComponentSpec


@dataclass(frozen=True)
class ComponentInfo:
    """One row of :meth:`~diffblocks.components.ComponentsManager.table`."""

    key: str
    name: str
    class_name: str
    loaded: bool
    device: str
    dtype: str
    memory_bytes: int
    users: tuple[str, ...]


def component_info(
    key: str, name: str, obj: Any, *, cls: type | None, spec: ComponentSpec | None, users: Iterable[str]
) -> ComponentInfo:
    """The row of one component: ``obj`` is None while it is not loaded (its class then comes from ``cls`` or the spec's type hint)."""
    cls = cls or (type(obj) if obj is not None else None)
    class_name = cls.__name__ if cls else (spec.type_hint[1] if spec and spec.type_hint else "?")
    device, dtype, size = "-", "-", 0
    tensors = [*obj.parameters(), *obj.buffers()] if isinstance(obj, torch.nn.Module) else []
    if tensors:
        size = sum(t.numel() * t.element_size() for t in tensors)
        device = ",".join(sorted({str(t.device) for t in tensors}))
        dtype = ",".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors}))
    return ComponentInfo(key, name, class_name, obj is not None, device, dtype, size, tuple(sorted(users)))


def format_table(rows: Iterable[ComponentInfo]) -> str:
    """``rows`` as a fixed-width table, sizes in MiB (what ``repr(manager)`` shows)."""
    lines = [f"{'name':<16} {'class':<32} {'loaded':<6} {'device':<8} {'dtype':<10} {'MiB':>9}  users"]
    for row in rows:
        lines.append(f"{row.name:<16} {row.class_name:<32} {str(row.loaded):<6} {row.device:<8} {row.dtype:<10} "
                     f"{row.memory_bytes / 2**20:9.1f}  {', '.join(row.users)}")
    return "\n".join(lines)
