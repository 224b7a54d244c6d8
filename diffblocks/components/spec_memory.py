"""A component spec's model in memory before it loads: what it weighs, what loading it holds, which files it maps from.

The manager plans from these before any weight is read (``manager.plan()``): a model given by a
config is built on the meta device, one in a local folder is read from its safetensors headers,
and what loading it straight into memory maps would hold of CPU memory (under disk offload) is
its largest tensor at the dtype it loads as. A Hub id not yet downloaded, and a quantized spec,
are measured once loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from diffblocks.components.memory import ModelSize, measure
from diffblocks.components.memory.disk import register_weight_files
from diffblocks.components.memory.estimate import mapped_loading_peak, size_before_loading
from diffblocks.components.specs import ComponentSpec
from diffblocks.components.transformers_mapped import is_transformers_model, transformers_loading_peak


def component_sizes(
    components: Iterable[tuple[str, str, Any, ComponentSpec | None]], component_type: Callable[[str], type | None]
) -> dict[str, ModelSize]:
    """The size of each model among ``components`` (name, key, the loaded object or None, its spec), by name.

    A loaded model is measured as it is, a spec's model before it loads; one object under several
    names (or pipelines) counts once, and a second component of one name is listed by its key.
    """
    sizes: dict[str, ModelSize] = {}
    seen: set[int] = set()
    for name, key, obj, spec in components:
        if obj is not None and id(obj) in seen:
            continue
        seen.add(id(obj))
        size: ModelSize | None = None
        if isinstance(obj, torch.nn.Module):
            size = measure(obj)
            if spec is not None:
                size = with_loading_peak(component_type(key), spec, size)
        elif obj is None and spec is not None:
            size = size_of_spec(component_type(key), spec)
        if size is not None:
            sizes[name if name not in sizes else key] = size
    return sizes


def size_of_spec(cls: type | None, spec: ComponentSpec) -> ModelSize | None:
    """The size of ``spec``'s model (of class ``cls``) before it loads, with its loading peak where known (None: measured once loaded)."""
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)) or spec.quantization is not None:
        return None  # not a model, or quantized: measured once loaded
    if spec.repo is None:
        return size_before_loading(cls, config=spec.config, dtype=spec.torch_dtype)
    folder = Path(spec.repo) / (spec.subfolder or "")  # a local folder; a Hub id is measured once loaded
    size = size_before_loading(cls, folder=folder, variant=spec.variant, dtype=spec.torch_dtype)
    return with_loading_peak(cls, spec, size) if size is not None else None


def with_loading_peak(cls: type | None, spec: ComponentSpec, size: ModelSize) -> ModelSize:
    """``size`` with what loading it straight into memory maps would hold of CPU memory, where it can (disk offload)."""
    if spec.repo is None or spec.quantization is not None or not isinstance(cls, type):
        return size
    folder = Path(spec.repo) / (spec.subfolder or "")  # a local folder; a Hub id counts whole, on the high side
    if is_transformers_model(cls):
        peak = transformers_loading_peak(cls, folder=folder, variant=spec.variant, dtype=spec.torch_dtype)
    else:
        peak = mapped_loading_peak(cls, folder=folder, variant=spec.variant, dtype=spec.torch_dtype)
    return replace(size, loading=peak) if peak is not None else size


def record_weight_files(obj: Any, spec: ComponentSpec) -> None:
    """Tell disk offload which local safetensors files a model came from, so it maps them rather than writing its own."""
    if not isinstance(obj, torch.nn.Module) or spec.repo is None or spec.quantization is not None:
        return
    folder = Path(spec.repo) / (spec.subfolder or "")
    if folder.is_dir():
        files = sorted(folder.glob("*.safetensors"))
        register_weight_files(obj, [f for f in files if (spec.variant is None) or f".{spec.variant}." in f.name])


__all__ = ["record_weight_files", "size_of_spec", "with_loading_peak"]
