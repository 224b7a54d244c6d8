"""Read diffusers-format weight folders into meta-built modules.

A diffusers model folder holds ``config.json`` plus the weights, in one of these layouts
(``fp16`` stands for any variant):

- ``diffusion_pytorch_model[.fp16].safetensors`` (one file);
- ``diffusion_pytorch_model.safetensors.index[.fp16].json`` naming shards such as
  ``diffusion_pytorch_model[.fp16]-00001-of-00002.safetensors`` (older variant indexes are called
  ``diffusion_pytorch_model.safetensors.fp16.index.json``);
- the same with ``.bin`` pickles, read only on explicit opt-in.

Tensors are read shard by shard, cast, and *assigned* into the module, so the weights are
allocated once. :func:`load_weights_mapped` allocates none: each weight is a view of a memory map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from diffblocks.components.config_files import read_json_object
from diffblocks.components.containment import check_shard_names
from diffblocks.components.memory.disk import MappedWeights, MemoryMap, mapped_views, record_mapped, register_weight_files
from diffblocks.components.models.buffers import materialize_computed_buffers, meta_tensor_names

WEIGHTS_STEM = "diffusion_pytorch_model"
CONFIG_NAME = "config.json"
_LIST_LIMIT = 10
_ALIGNMENT = 64  # bytes; what PyTorch's CPU allocator guarantees

_MSG_PICKLE = (
    "{folder} holds only pickle weights ({name}). diffblocks loads safetensors by default because "
    "unpickling can run arbitrary code. Convert the weights to safetensors, or, if you trust the "
    "source, pass allow_pickle=True (the file is then read with torch.load(weights_only=True))."
)
_MSG_CORRUPT = (
    "cannot read {path}: {err}. The file is truncated or corrupt (an interrupted download?); "
    "delete it and download it again."
)


class CheckpointError(RuntimeError):
    """A weights folder is missing, unreadable, or does not match the model it is loaded into."""


def _variant(name: str, variant: str | None) -> str:
    """Insert ``variant`` before the extension: ``a.safetensors`` -> ``a.fp16.safetensors``."""
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def index_names(ext: str, variant: str | None) -> list[str]:
    """Index file names for ``ext`` (``safetensors`` or ``bin``), current naming first."""
    names = [_variant(f"{WEIGHTS_STEM}.{ext}.index.json", variant)]
    if variant is not None:
        names.append(f"{WEIGHTS_STEM}.{ext}.{variant}.index.json")
    return names


def single_name(ext: str, variant: str | None) -> str:
    """The unsharded weight file name for ``ext`` and ``variant``."""
    return _variant(f"{WEIGHTS_STEM}.{ext}", variant)


def hub_patterns(variant: str | None, *, allow_pickle: bool = False) -> list[str]:
    """File patterns to fetch from the Hub: the config and this variant's weights, nothing else."""
    patterns = [CONFIG_NAME]
    for ext in ("safetensors", "bin") if allow_pickle else ("safetensors",):
        single = single_name(ext, variant)
        patterns += [single, single.replace(f".{ext}", f"-*.{ext}"), *index_names(ext, variant)]
    return patterns


def _files_for(folder: Path, ext: str, variant: str | None) -> list[Path]:
    for index_name in index_names(ext, variant):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = read_json_object(index, what="a weight index")["weight_map"]
            except (ValueError, KeyError) as err:
                raise CheckpointError(_MSG_CORRUPT.format(path=index, err=err)) from err
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: weight_map is a JSON {type(weight_map).__name__}, not an object of key -> shard file")
            # shards are files of this extension in this folder: never ../ paths, links out, or pickles
            shards = check_shard_names(index, [str(name) for name in weight_map.values()], repository=str(folder))
            absent = [p.name for p in shards if not p.is_file()]
            if absent:
                raise CheckpointError(f"{index} names shards that are not in {folder}: {_listing(absent)}")
            return shards
    single = folder / single_name(ext, variant)
    return [single] if single.is_file() else []


def find_weight_files(folder: Path, *, variant: str | None = None, allow_pickle: bool = False) -> list[Path]:
    """The weight files of ``folder``: safetensors first, pickles only when ``allow_pickle``.

    Raises:
        FileNotFoundError: no weights for ``variant``; the message lists what the folder has.
        CheckpointError: only pickles exist and ``allow_pickle`` is False, or an index is broken.
        RepositoryPathError: an index names a shard outside ``folder`` or of another format.
    """
    files = _files_for(folder, "safetensors", variant)
    if files:
        return files
    pickles = _files_for(folder, "bin", variant)
    if pickles and not allow_pickle:
        raise CheckpointError(_MSG_PICKLE.format(folder=folder, name=pickles[0].name))
    if pickles:
        return pickles
    present = sorted(p.name for p in folder.iterdir() if p.name.startswith(WEIGHTS_STEM))
    raise FileNotFoundError(
        f"no {single_name('safetensors', variant)} (or sharded index) in {folder}; "
        f"weight files present: {present or 'none'}"
        + ("; pass variant=... to pick one" if present and variant is None else "")
    )


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT])
    more = f" ... and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else ""
    return f"{shown}{more} ({len(names)} in all)"


def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and safetensors dtype name (``F32``, ``I64``, ...) of every tensor, read from the header alone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: (tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype()) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(_MSG_CORRUPT.format(path=path, err=err)) from err


_FLOAT_NAMES = ("F", "BF")  # safetensors dtype names of floating-point tensors: F16, F32, F64, BF16, F8_E4M3, ...


def _kind(dtype: torch.dtype | str) -> str:
    """``float``, ``complex`` or ``integer`` (bool included), from a torch dtype or a safetensors dtype name."""
    if isinstance(dtype, str):
        return "float" if dtype.startswith(_FLOAT_NAMES) else "complex" if dtype.startswith("C") else "integer"
    return "float" if dtype.is_floating_point else "complex" if dtype.is_complex else "integer"


def check_dtypes(declared: Mapping[str, torch.dtype], found: Mapping[str, torch.dtype | str], *, model: str, where: Path) -> None:
    """Raise a :class:`CheckpointError` when a weight is of another kind than the model's (integers for floats, ...).

    Floats of another width are cast when loaded; an integer, boolean or complex tensor in place of
    a float weight (or the reverse) is a different checkpoint format, and would fail at the first call.
    """
    wrong = [
        f"{key} {dtype} (the model's is {declared[key]})"
        for key, dtype in found.items()
        if key in declared and _kind(dtype) != _kind(declared[key])
    ]
    if wrong:
        raise CheckpointError(
            f"the weights in {where} have dtypes {model} cannot use: {_listing(wrong)}. "
            "Is it a quantized or otherwise converted checkpoint? Load the original floating-point weights."
        )


def _read_tensors(path: Path, *, device: torch.device) -> dict[str, Tensor]:
    if path.suffix == ".bin":
        state: dict[str, Tensor] = torch.load(path, map_location=device, weights_only=True)
        return state
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(_MSG_CORRUPT.format(path=path, err=err)) from err


def check_keys(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], *, model: str, where: Path
) -> None:
    """Raise one :class:`CheckpointError` listing missing, unexpected and wrongly shaped keys."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} {found[k]} != {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    problems = [
        f"missing keys: {_listing(missing)}" if missing else "",
        f"unexpected keys: {_listing(unexpected)}" if unexpected else "",
        f"wrong shapes (checkpoint != model): {_listing(wrong)}" if wrong else "",
    ]
    if any(problems):
        detail = "\n  ".join(p for p in problems if p)
        raise CheckpointError(
            f"the weights in {where} do not match {model} built from its config.json:\n  {detail}\n"
            "Is the folder for a different model, or its config.json edited?"
        )


def load_weights(
    module: nn.Module,
    files: Sequence[Path],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> None:
    """Fill a meta-built ``module`` from ``files`` and materialise its computed buffers.

    Args:
        module: built under ``torch.device("meta")``; its tensors are replaced, not copied into.
        files: weight files from :func:`find_weight_files`.
        dtype: cast floating-point weights to this; by default each weight takes the dtype the
            module declared for it (float32 unless the model says otherwise).
        device: where the weights are read to.
    """
    device = torch.device(device)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    declared = {k: v.dtype for k, v in module.state_dict().items()}
    found: dict[str, tuple[int, ...]] = {}
    if files[0].suffix == ".safetensors":
        kinds: dict[str, str] = {}
        for path in files:
            header = _read_header(path)
            found.update({key: shape for key, (shape, _) in header.items()})
            kinds.update({key: dtype for key, (_, dtype) in header.items()})
        check_keys(expected, found, model=type(module).__name__, where=files[0].parent)
        check_dtypes(declared, kinds, model=type(module).__name__, where=files[0].parent)
    for path in files:
        state = _read_tensors(path, device=device)
        if path.suffix == ".bin":
            found.update({k: tuple(v.shape) for k, v in state.items()})
            check_dtypes(declared, {k: v.dtype for k, v in state.items()}, model=type(module).__name__, where=path)
        _assign(module, state, expected, declared, dtype)
    if files[0].suffix == ".bin":
        check_keys(expected, found, model=type(module).__name__, where=files[0].parent)
    _finish(module, device)


def load_weights_mapped(
    module: nn.Module, files: Sequence[Path], *, dtype: torch.dtype | None = None, memory_map: MemoryMap
) -> MappedWeights:
    """Fill a meta-built ``module`` from safetensors ``files`` with views of their memory maps (see :class:`MemoryMap`).

    The keys, shapes and dtypes are checked as :func:`load_weights` checks them, before a weight is
    read. A weight the file holds at the dtype it loads as (and aligned, if asked) is a view of the
    file: nothing is read until it is used, and then into the page cache, not the process's memory.
    The others are cast (or copied, to align them) one at a time on their way to a file of the
    loader's own, then mapped from it. Disk offload keeps the maps when it attaches.

    Returns:
        the bytes mapped from ``files`` and the bytes written first.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    declared = {k: v.dtype for k, v in module.state_dict().items()}
    headers = {path: _read_header(path) for path in files}
    found = {key: shape for header in headers.values() for key, (shape, _) in header.items()}
    check_keys(expected, found, model=type(module).__name__, where=files[0].parent)
    check_dtypes(declared, {key: kind for h in headers.values() for key, (_, kind) in h.items()},
                 model=type(module).__name__, where=files[0].parent)
    views, weights = mapped_views(files, lambda key, view: (dtype or declared[key]) if view.is_floating_point() else view.dtype,
                                  memory_map=memory_map)
    module.load_state_dict(views, strict=False, assign=True)
    _finish(module, torch.device("cpu"))
    record_mapped(module, views.keys())
    register_weight_files(module, files)
    return weights


def load_state(
    module: nn.Module,
    state: Mapping[str, Tensor],
    *,
    where: Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> None:
    """Fill a meta-built ``module`` from ``state`` (converted from another layout) as :func:`load_weights` does.

    Raises:
        CheckpointError: keys are missing, unexpected or of the wrong shape (``where`` names the file).
    """
    device = torch.device(device)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    declared = {k: v.dtype for k, v in module.state_dict().items()}
    check_keys(expected, {k: tuple(v.shape) for k, v in state.items()}, model=type(module).__name__, where=where)
    check_dtypes(declared, {k: v.dtype for k, v in state.items()}, model=type(module).__name__, where=where)
    _assign(module, {k: v.to(device) for k, v in state.items()}, expected, declared, dtype)
    _finish(module, device)


def _assign(
    module: nn.Module,
    state: dict[str, Tensor],
    expected: Mapping[str, tuple[int, ...]],
    declared: Mapping[str, torch.dtype],
    dtype: torch.dtype | None,
) -> None:
    for key, tensor in state.items():
        target = (dtype or declared[key]) if key in declared and tensor.is_floating_point() else tensor.dtype
        # safetensors hands out CPU buffers with arbitrary alignment; kernels then take unaligned code
        # paths that are slower and round differently, so such tensors are copied (one at a time).
        misaligned = tensor.device.type == "cpu" and tensor.data_ptr() % _ALIGNMENT != 0
        state[key] = tensor.to(target, copy=misaligned)
    module.load_state_dict(
        {k: v for k, v in state.items() if k in expected and tuple(v.shape) == expected[k]},
        strict=False,
        assign=True,
    )


def _finish(module: nn.Module, device: torch.device) -> None:
    materialize_computed_buffers(module, device=device)
    left = meta_tensor_names(module)
    if left:
        raise CheckpointError(
            f"{type(module).__name__} has tensors that neither the checkpoint nor the model fills: "
            f"{_listing(left)}; register them as persistent buffers or through AbstractComputedBuffers."
        )


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_STEM",
    "CheckpointError",
    "check_dtypes",
    "check_keys",
    "find_weight_files",
    "hub_patterns",
    "index_names",
    "load_state",
    "load_weights",
    "load_weights_mapped",
    "single_name",
]
