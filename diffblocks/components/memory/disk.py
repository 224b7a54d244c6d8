"""Disk offload: a model's weights wait in a memory-mapped safetensors file, not in CPU memory.

Group offload keeps a home copy of every streamed weight in (pinned) CPU memory, so a machine
needs as much RAM as its models weigh. Disk offload keeps that home in a file instead: each of the
model's tensors becomes a view of a memory map (``mmap``), which holds no memory of its own; the
operating system reads a page from disk when a copy to the device touches it, and may drop it
again at will (it is page cache, not the process's memory). Everything else is group offload
(:func:`~diffblocks.components.memory.policies.attach_groups`): the repeated blocks stream to the
device as they run, the rest lives on the device; or, with ``leaf=True``, leaf offload
(:func:`~diffblocks.components.memory.policies.attach_leaves`): every layer streams, none stays.

The home of a tensor is, in this order:

1. the safetensors file the model was loaded from (:func:`register_weight_files`), when the file
   holds the tensor exactly as the model does (the same dtype, shape and values, and, for a model
   that runs on the CPU, 64-byte aligned as the loader makes its tensors): nothing is copied;
2. otherwise (weights cast on loading, a fused adapter, a model built in memory) a file of the
   policy's own, written once when the policy is attached, the in-memory copy dropped after.

The map is private (copy-on-write): a weight changed in place while on the device is written back
to the process's own copy of that page, never to the file.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, final
from weakref import WeakKeyDictionary

import torch
from torch import nn

from diffblocks.components.memory.measure import ModelSize
from diffblocks.components.memory.mover import Mover
from diffblocks.components.memory.policies import AbstractOffload, Attached, GroupOffload, LeafOffload, attach_groups, attach_leaves
from diffblocks.components.memory.streams import Synchronous

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_PADDING = "__padding__."
_ALIGNMENT = 64  # bytes; what PyTorch's CPU allocator guarantees, and so what the loader gives every CPU tensor

_SOURCES: WeakKeyDictionary[nn.Module, tuple[Path, ...]] = WeakKeyDictionary()
_MAPPED: WeakKeyDictionary[nn.Module, dict[str, int]] = WeakKeyDictionary()  # each mapped tensor's address, by key


def register_weight_files(model: nn.Module, files: Sequence[Path]) -> None:
    """Record the safetensors files ``model`` was loaded from, so that disk offload maps them instead of writing its own."""
    _SOURCES[model] = tuple(Path(f) for f in files if Path(f).suffix == ".safetensors")


def weight_files(model: nn.Module) -> tuple[Path, ...]:
    """The safetensors files recorded for ``model`` (empty: none known)."""
    return _SOURCES.get(model, ())


def record_mapped(model: nn.Module, keys: Collection[str]) -> None:
    """Record that ``model``'s tensors named ``keys`` are views of memory maps already (a loader put them there).

    Disk offload then keeps them where they are when it attaches, as it keeps what it mapped itself.
    """
    _MAPPED[model] = {slot[1]: _get(slot).data_ptr() for slot in _slots(model) if slot[1] in keys}


def is_mapped(model: nn.Module) -> bool:
    """Whether every tensor of ``model`` is a view of a memory map that disk offload made or was told of."""
    mapped = _MAPPED.get(model, {})
    return all(mapped.get(slot[1]) == _get(slot).data_ptr() for slot in _slots(model))


@final
@dataclass(frozen=True)
class MemoryMap:
    """How to load a model straight into memory maps (``from_pretrained(..., memory_map=MemoryMap())``).

    The model is built on the meta device and each weight becomes a view of the safetensors file
    that holds it, where the file holds it as the model needs it (the dtype it loads as; 64-byte
    aligned when ``aligned``). The rest (weights cast to another dtype, unaligned ones) is written
    once, one tensor at a time, to a file of its own, unlinked at once (the map keeps it). CPU
    memory then holds at most the largest cast tensor while loading, and none of the weights after.

    Args:
        folder: where that file is written (default: the system's temporary folder; give a folder
            on a real disk if that is a RAM disk, ``tmpfs``).
        aligned: take a file's tensor only where it starts at a multiple of 64 bytes, as the model
            needs when it computes on the CPU (unaligned tensors take slower kernels that round
            differently); a model that computes on an accelerator copies its weights there anyway.
    """

    folder: str | None = None
    aligned: bool = True

    def __post_init__(self) -> None:
        if self.folder is not None and not Path(self.folder).is_dir():
            raise ValueError(f"MemoryMap: folder {self.folder!r} is not a folder: give an existing folder on a disk with room for the weights")


@final
class MappedFile:
    """A safetensors file, memory-mapped: :meth:`tensor` returns views of the map, read from disk when touched.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> path = tempfile.mkdtemp() + "/w.safetensors"
        >>> save_file({"w": torch.arange(6.0).reshape(2, 3)}, path)
        >>> MappedFile(path).tensor("w")
        tensor([[0., 1., 2.],
                [3., 4., 5.]])
    """

    def __init__(self, path: str | Path | IO[bytes]) -> None:
        if isinstance(path, (str, Path)):
            with open(path, "rb") as f:  # the map outlives the file object
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        else:
            self._map = mmap.mmap(path.fileno(), 0, access=mmap.ACCESS_COPY)
        (length,) = struct.unpack("<Q", self._map[:8])
        header: dict[str, Any] = json.loads(self._map[8 : 8 + length])
        header.pop("__metadata__", None)
        self.entries: dict[str, Any] = header
        self._start = 8 + length

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name``, a view of the map (no memory of its own)."""
        entry = self.entries[name]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"disk offload cannot map tensor {name!r} of dtype {entry['dtype']}: keep this model in memory")
        begin, end = entry["data_offsets"]
        if begin == end:
            return torch.empty(entry["shape"], dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=self._start + begin)
        return flat.view(entry["shape"])


def write_aligned(f: IO[bytes], tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Write ``tensors`` to ``f`` as a safetensors file whose every tensor starts at a multiple of 64 bytes.

    Padding between tensors is written as byte tensors named ``__padding__.N``, so the file stays a
    valid safetensors file. Each tensor is written from its own memory (no serialised copy of the whole file is made, as
    ``safetensors.torch.save_file`` would), so writing costs at most one tensor's bytes on top.
    """
    items = {name: t.detach() for name, t in tensors}
    write_lazily(f, [(name, t.dtype, tuple(t.shape)) for name, t in items.items()], items.__getitem__)


def write_lazily(
    f: IO[bytes], entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], tensor: Callable[[str], torch.Tensor]
) -> None:
    """:func:`write_aligned` for tensors made one at a time: ``tensor(name)`` is called when its turn comes, and dropped after.

    The header needs only each tensor's name, dtype and shape, so a loader that casts weights on
    their way to the file holds one cast tensor at a time, never the model.
    """
    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in entries:
        gap = -offset % _ALIGNMENT
        if gap:  # safetensors wants no holes between tensors: the padding is a byte tensor of its own
            header[f"{_PADDING}{len(header)}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            offset += gap
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % _ALIGNMENT)  # the data starts aligned too
    f.write(struct.pack("<Q", len(text)) + text)
    written = 0
    for name, dtype, shape in entries:
        begin, end = header[name]["data_offsets"]
        f.write(b"\0" * (begin - written))
        if end > begin:
            made = tensor(name).detach()
            assert made.dtype == dtype and tuple(made.shape) == tuple(shape), f"{name}: {made.dtype} {tuple(made.shape)}"
            f.write(memoryview(made.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
            del made
        written = end
    f.flush()


@final
class _FromDisk(Synchronous):
    """The mover's copies, without pinning: pinning a mapped tensor would copy it into memory, the very thing avoided."""

    def __init__(self, inner: Synchronous) -> None:
        super().__init__(inner.device)
        self.inner = inner

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def copy(self, label: str, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        return self.inner.copy(label, tensors)

    def wait(self, label: str, ready: Any) -> None:
        self.inner.wait(label, ready)

    def done(self, label: str, ready: Any) -> None:
        self.inner.done(label, ready)

    def kept(self) -> Synchronous:
        return _FromDisk(self.inner.kept())

    def clear(self) -> None:
        self.inner.clear()


@final
@dataclass(frozen=True)
class MappedWeights:
    """How a model's tensors were mapped: bytes mapped from the files it was loaded from, bytes written first, bytes mapped before."""

    from_source: int
    written: int
    already: int = 0


def mapped_views(
    files: Sequence[Path], target: Callable[[str, torch.Tensor], torch.dtype], *, memory_map: MemoryMap
) -> tuple[dict[str, torch.Tensor], MappedWeights]:
    """Every tensor of safetensors ``files`` as a view of a memory map, at the dtype ``target(key, view)`` names.

    A tensor the file holds at that dtype (and aligned, if ``memory_map.aligned``) is a view of the
    file itself; the others are cast (or copied, to align them) one at a time into a file of the
    loader's own, unlinked at once, and mapped from it. Nothing else is held in CPU memory.
    """
    views: dict[str, torch.Tensor] = {}
    cast: dict[str, tuple[torch.Tensor, torch.dtype]] = {}  # read through a cast or a copy into the loader's own file
    for path in files:
        source = MappedFile(path)
        for key in source.entries:
            view = source.tensor(key)
            wanted = target(key, view)
            aligned = not memory_map.aligned or view.numel() == 0 or view.data_ptr() % _ALIGNMENT == 0
            if view.dtype == wanted and aligned:
                views[key] = view
            else:
                cast[key] = (view, wanted)
    from_source = sum(t.numel() * t.element_size() for t in views.values())
    if cast:
        with tempfile.TemporaryFile(dir=memory_map.folder) as f:  # unlinked: the map keeps its pages, nothing is left behind
            write_lazily(f, [(key, wanted, tuple(view.shape)) for key, (view, wanted) in cast.items()],
                         lambda key: cast[key][0].to(cast[key][1]))
            own = MappedFile(f)
        views.update({key: own.tensor(key) for key in cast})
    written = sum(t.numel() * t.element_size() for t in views.values()) - from_source
    return views, MappedWeights(from_source=from_source, written=written)


def map_model(model: nn.Module, *, folder: str | None = None, aligned: bool = True) -> MappedWeights:
    """Make every tensor of ``model`` a view of a memory-mapped safetensors file (see the module docstring).

    Args:
        model: its tensors are replaced in place (the same ``nn.Parameter`` objects, their ``.data``
            swapped), and the in-memory copies dropped.
        folder: where tensors that no source file holds are written (default: the system's temporary
            folder); the file is unlinked at once and lives as long as the map.
        aligned: take a source file's tensor only where it is 64-byte aligned (a model that computes
            on the CPU reads the view itself; unaligned tensors take slower kernels that round differently).
    """
    slots = list(_slots(model))
    sources = [MappedFile(path) for path in weight_files(model)]
    mapped_before = _MAPPED.get(model, {})
    found: dict[int, torch.Tensor] = {}
    kept: dict[int, torch.Tensor] = {}  # mapped by an earlier call and still in place (a policy attached again)
    for i, (_owner, key, _module, _attr, _is_param) in enumerate(slots):
        current = _get(slots[i])
        if mapped_before.get(key) == current.data_ptr() and current.device.type == "cpu":
            kept[i] = current
            continue
        for source in sources:
            if key not in source.entries or current.device.type == "meta":
                continue
            view = source.tensor(key)
            ok = view.dtype == current.dtype and view.shape == current.shape and (not aligned or view.data_ptr() % _ALIGNMENT == 0)
            if ok and torch.equal(view, current.to("cpu")):
                found[i] = view
            break
    rest = [(str(i), _get(slot)) for i, slot in enumerate(slots) if i not in found and i not in kept]
    written: dict[int, torch.Tensor] = {}
    if rest:
        with tempfile.TemporaryFile(dir=folder) as f:  # unlinked: the map keeps its pages, nothing is left behind
            write_aligned(f, rest)
            mapped = MappedFile(f)
        written = {int(name): mapped.tensor(name) for name, _ in rest}
    with torch.inference_mode(False), torch.no_grad():
        for i, slot in enumerate(slots):
            if i not in kept:
                _put(slot, found[i] if i in found else written[i])
    _MAPPED[model] = {slot[1]: _get(slot).data_ptr() for slot in slots}
    size = lambda views: sum(t.numel() * t.element_size() for t in views.values())  # noqa: E731
    return MappedWeights(from_source=size(found), written=size(written), already=size(kept))


_Slot = tuple[nn.Module, str, nn.Module, str, bool]  # (model, state-dict key, owning module, attribute, is a parameter)


def _slots(model: nn.Module) -> Iterator[_Slot]:
    seen: set[int] = set()  # a parameter tied into two modules is mapped once
    for prefix, module in model.named_modules():
        for attr, param in module._parameters.items():  # noqa: SLF001 - the slots nn.Module.to fills
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                yield model, f"{prefix}.{attr}" if prefix else attr, module, attr, True
        for attr, buffer in module._buffers.items():  # noqa: SLF001
            if buffer is not None:
                yield model, f"{prefix}.{attr}" if prefix else attr, module, attr, False


def _get(slot: _Slot) -> torch.Tensor:
    _, _, module, attr, is_param = slot
    tensor = module._parameters[attr] if is_param else module._buffers[attr]  # noqa: SLF001
    assert tensor is not None
    return tensor.data if is_param else tensor


def _put(slot: _Slot, tensor: torch.Tensor) -> None:
    _, _, module, attr, is_param = slot
    if is_param:
        param = module._parameters[attr]  # noqa: SLF001
        assert param is not None
        param.data = tensor
    else:
        module._buffers[attr] = tensor  # noqa: SLF001


@final
@dataclass(frozen=True)
class DiskOffload(AbstractOffload):
    """Group offload whose home is a memory-mapped safetensors file: for machines with little CPU memory.

    On the device it holds what :class:`~diffblocks.components.memory.GroupOffload` holds (with
    ``leaf``, what :class:`~diffblocks.components.memory.LeafOffload` holds: the largest layer); in
    CPU memory, none of the model's weights (their pages are the operating system's cache of the
    file). Copies to the device read pageable memory (no pinning), so they overlap compute less
    than group offload's.

    Args:
        blocks_per_group: consecutive entries of one ``nn.ModuleList`` that move together (>= 1).
        prefetch: fetch the next group while one runs (two groups on the device at once).
        folder: where tensors no source file holds are written once (default: the system's temporary
            folder; if that is a RAM disk, ``tmpfs``, give a folder on a real disk).
        leaf: each layer's tensors read in as it runs and dropped after, nothing kept on the device
            (``blocks_per_group`` and ``prefetch`` then do not apply): for a device too small for one group.
    """

    blocks_per_group: int = 1
    prefetch: bool = field(default=True, repr=False)
    folder: str | None = field(default=None, repr=False)
    leaf: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.blocks_per_group < 1:
            raise ValueError(f"DiskOffload: blocks_per_group {self.blocks_per_group} must be >= 1")
        if self.leaf and self.blocks_per_group != 1:
            raise ValueError(f"DiskOffload: leaf=True streams each layer alone: blocks_per_group {self.blocks_per_group} does not apply")
        if self.leaf:
            object.__setattr__(self, "prefetch", False)  # nothing is fetched ahead: equal however it was written
        if self.folder is not None and not Path(self.folder).is_dir():
            raise ValueError(f"DiskOffload: folder {self.folder!r} is not a folder: give an existing folder on a disk with room for the weights")

    def __repr__(self) -> str:
        if self.leaf:
            return "DiskOffload(leaf=True)"
        return f"DiskOffload(blocks_per_group={self.blocks_per_group}" + (")" if self.prefetch else ", prefetch=False)")

    def peak(self, sizes: Sequence[ModelSize]) -> int:
        return LeafOffload().peak(sizes) if self.leaf else GroupOffload(self.blocks_per_group, prefetch=self.prefetch).peak(sizes)

    def attach(self, name: str, model: nn.Module, mover: Mover) -> Attached:
        map_model(model, folder=self.folder, aligned=mover.device.type == "cpu")
        if self.leaf:
            return attach_leaves(name, model, mover, streams=_FromDisk(mover.streams))
        return attach_groups(name, model, mover, blocks_per_group=self.blocks_per_group, prefetch=self.prefetch,
                             streams=_FromDisk(mover.streams))

    def describe(self) -> str:
        if self.leaf:
            return "each layer's tensors read in from a memory-mapped file as it runs and dropped after; nothing stays on the device"
        return (f"repeated blocks stream in {self.blocks_per_group} at a time from a memory-mapped file, not from CPU memory; "
                "the rest stays on the device")
