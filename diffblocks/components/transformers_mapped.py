"""transformers' models (the text encoders) loaded straight into memory maps, as disk offload keeps them.

Each tensor of the model's safetensors files becomes a view of its file; one that must load at
another dtype is cast into a file of the loader's own, one tensor at a time
(:func:`~diffblocks.components.memory.disk.mapped_views`). transformers then builds the model on
the meta device around those views (``from_pretrained`` with a ``state_dict``) and keeps them,
since each is already at the dtype it loads as: its key conversions, tied weights and defaults
stay its own. So CPU memory holds at most one cast tensor while loading, and none of the weights
after.

The dtype each tensor loads as is transformers' own rule: the one asked for (without one, the
file's own from transformers 5 on, float32 before), except the modules a class keeps in float32
(``_keep_in_fp32_modules`` under float16, ``_keep_in_fp32_modules_strict`` under float16 and
bfloat16), which load as float32.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffblocks.components.config_files import read_json_object
from diffblocks.components.containment import check_shard_names
from diffblocks.components.memory.disk import MemoryMap, mapped_views, record_mapped, register_weight_files
from diffblocks.components.memory.estimate import largest_tensor


def is_transformers_model(cls: object) -> bool:
    """Whether ``cls`` is a transformers ``PreTrainedModel`` class (checked without importing transformers for others)."""
    if not isinstance(cls, type) or cls.__module__.split(".")[0] != "transformers":
        return False
    from transformers import PreTrainedModel

    return issubclass(cls, PreTrainedModel)


def load_transformers_mapped(cls: type, folder: Path, *, variant: str | None, dtype: torch.dtype | None, memory_map: MemoryMap) -> Any:
    """``cls`` (a transformers ``PreTrainedModel``) from ``folder``, every weight a view of a memory map (see the module docstring).

    Raises:
        FileNotFoundError: no safetensors weights for ``variant`` as transformers names them.
        RepositoryPathError: the weight index names a file outside ``folder``.
    """
    files = transformers_weight_files(folder, variant)
    load_dtype = transformers_load_dtype(cls, dtype)
    views, _ = mapped_views(files, lambda key, view: (load_dtype(key) or view.dtype) if view.is_floating_point() else view.dtype,
                            memory_map=memory_map)
    config = cls.config_class.from_pretrained(folder, local_files_only=True)  # type: ignore[attr-defined]
    model = cls.from_pretrained(None, config=config, state_dict=views, **({"dtype": dtype} if dtype is not None else {}))  # type: ignore[attr-defined]
    model.eval()
    addresses = {view.data_ptr() for view in views.values() if view.numel()}
    record_mapped(model, [key for key, tensor in model.state_dict().items() if tensor.data_ptr() in addresses])
    register_weight_files(model, files)
    return model


def transformers_weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The safetensors files transformers reads from ``folder`` for ``variant``: those its index names, or ``model[.variant].safetensors``.

    Raises:
        FileNotFoundError: neither is there.
        ValueError: the index names no files; RepositoryPathError: it names one outside ``folder`` (or not a safetensors file).
    """
    index = folder / ("model.safetensors.index.json" if not variant else f"model.safetensors.index.{variant}.json")
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} names no weight files (its weight_map is missing or empty): is the folder complete?")
        return check_shard_names(index, sorted({str(name) for name in weight_map.values()}), repository=str(folder))
    single = folder / ("model.safetensors" if not variant else f"model.{variant}.safetensors")
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"{folder} has no safetensors weights{f' for variant {variant!r}' if variant else ''} named as transformers names them "
        "(model.safetensors, or model.safetensors.index.json and its shards); diffblocks loads text encoders from "
        "safetensors only (transformers: model.save_pretrained(folder, safe_serialization=True))."
    )


def transformers_load_dtype(cls: type, dtype: torch.dtype | None) -> Callable[[str], torch.dtype | None]:
    """The dtype transformers loads the floating-point weight ``key`` of ``cls`` as, asked for ``dtype`` (None: the file's own)."""
    import transformers

    default = dtype if dtype is not None or int(transformers.__version__.split(".")[0]) >= 5 else torch.float32
    patterns = [*(getattr(cls, "_keep_in_fp32_modules", None) or ())] if dtype == torch.float16 else []
    if dtype in (torch.float16, torch.bfloat16):
        patterns += [*(getattr(cls, "_keep_in_fp32_modules_strict", None) or ())]
    if not patterns:
        return lambda _key: default
    # transformers matches each name anywhere in the weight's key, ``*`` standing for anything
    kept = re.compile("|".join(f"(?:{name.replace('*', '.*')})" for name in patterns))
    return lambda key: torch.float32 if kept.search(key) else default


def transformers_loading_peak(cls: type, *, folder: Path, variant: str | None = None, dtype: torch.dtype | None = None) -> int | None:
    """The most bytes of CPU memory :func:`load_transformers_mapped` holds: the largest tensor at the dtype it loads as, on the high side.

    None where the folder cannot load so: saved quantized (read into memory by the backend), no
    safetensors as transformers names them, an index naming files elsewhere.
    """
    from diffblocks.components.quantizers.transformers_format import saved_quantization

    if not folder.is_dir() or saved_quantization(folder) is not None:
        return None
    try:
        files = transformers_weight_files(folder, variant)
    except (FileNotFoundError, ValueError):
        return None
    return largest_tensor(files, transformers_load_dtype(cls, dtype))


__all__ = ["is_transformers_model", "load_transformers_mapped", "transformers_loading_peak", "transformers_load_dtype", "transformers_weight_files"]
