"""A model's size before it is loaded: built on the meta device from its config, or read from its safetensors headers."""

from __future__ import annotations

import inspect
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from diffblocks.components.memory.measure import ModelSize, measure

_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}  # others: 1 byte


def size_before_loading(
    cls: type[torch.nn.Module],
    *,
    config: Mapping[str, Any] | None = None,
    folder: Path | None = None,
    variant: str | None = None,
    dtype: torch.dtype | None = None,
) -> ModelSize | None:
    """``cls`` as it would load, measured without reading a weight (None when that is not possible).

    From a ``config``, the model is built on the meta device, which allocates nothing; from a
    local ``folder``, its safetensors headers are read. Quantized models and Hub ids not yet
    downloaded are measured once loaded (on the CPU).
    """
    if config is not None and hasattr(cls, "from_config"):
        with torch.device("meta"):
            model = cls.from_config(config)  # type: ignore[attr-defined]  # every registered model class has one
        return measure(model.to(dtype) if dtype is not None else model)
    if folder is None or not folder.is_dir():
        return None
    files = sorted(folder.glob("*.safetensors"))
    if variant is not None:
        files = [f for f in files if f".{variant}." in f.name]
    # without a dtype, our models and transformers' load floating-point weights as float32, whatever the file holds
    return header_size(files, dtype=dtype or torch.float32) if files else None


def header_size(files: list[Path], *, dtype: torch.dtype | None = None) -> ModelSize:
    """The :class:`ModelSize` of the tensors in ``files``, from their headers alone.

    A name's first numeric part marks a repeated block (``down_blocks.0.resnets.0.conv1.weight`` is
    in block 0 of ``down_blocks``), as its outermost ``nn.ModuleList`` would; a name without its
    last part is its layer. Floating-point tensors count at ``dtype`` when given (the dtype they load as).
    """
    blocks: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    leaves: dict[str, int] = defaultdict(int)
    total = 0
    for name, size in tensor_bytes(files, lambda _name: dtype):
        total += size
        leaves[name.rsplit(".", 1)[0]] += size
        parts = name.split(".")
        at = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if at is not None and at > 0:
            blocks[".".join(parts[:at])][int(parts[at])] += size
    grouped = tuple(sorted(tuple(entries[i] for i in sorted(entries)) for entries in blocks.values()))
    return ModelSize(total=total, blocks=grouped, largest_leaf=max(leaves.values(), default=0))


def mapped_loading_peak(cls: type, *, folder: Path, variant: str | None = None, dtype: torch.dtype | None = None) -> int | None:
    """The most bytes of CPU memory loading ``cls`` from ``folder`` straight into memory maps holds at once.

    That is its largest tensor at the dtype it loads as, on the high side: only a tensor cast to
    another dtype is ever made in memory, and one at a time (``MemoryMap`` in
    :mod:`~diffblocks.components.memory.disk`). None where the model cannot load so and is read
    into CPU memory whole: a class whose ``from_pretrained`` takes no ``memory_map`` (transformers'
    models have their own rule: ``diffblocks.components.transformers_mapped``), a folder without
    safetensors (pickles) or saved quantized, a folder not on this machine.
    """
    load = getattr(cls, "from_pretrained", None)
    if load is None or "memory_map" not in inspect.signature(load).parameters or not folder.is_dir():
        return None
    config = folder / "config.json"
    try:
        saved_quantized = config.is_file() and "quantization_config" in json.loads(config.read_text())
    except (ValueError, TypeError):  # not a JSON object: loading says so, with the file's name
        return None
    if saved_quantized:
        return None
    files = [f for f in sorted(folder.glob("*.safetensors")) if variant is None or f".{variant}." in f.name]
    # without a dtype, our models load floating-point weights as float32, whatever the file holds
    return largest_tensor(files, lambda _name: dtype or torch.float32) if files else None


def largest_tensor(files: list[Path], dtype_of: Callable[[str], torch.dtype | None]) -> int:
    """Bytes of the largest tensor in safetensors ``files``, a floating-point one at ``dtype_of(name)`` (None: its own), from the headers alone."""
    return max((size for _, size in tensor_bytes(files, dtype_of)), default=0)


def tensor_bytes(files: list[Path], dtype_of: Callable[[str], torch.dtype | None]) -> Iterator[tuple[str, int]]:
    """Each tensor's name in safetensors ``files`` and its bytes, a floating-point one at ``dtype_of(name)`` (None: its own), from the headers alone."""
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                piece = f.get_slice(name)
                kind = piece.get_dtype()
                wanted = dtype_of(name) if kind.startswith(("F", "BF")) else None
                itemsize = wanted.itemsize if wanted is not None else _ITEMSIZE.get(kind, 1)
                yield name, math.prod(piece.get_shape()) * itemsize
