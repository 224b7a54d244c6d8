"""What pinning offloaded weights costs: tensor by tensor, as one buffer per group, or registered in place.

Group offload keeps each streamed weight's home in pinned CPU memory, pinned once when the policy
is attached. This times the ways to get there for Flux-shaped weights (bf16 blocks of 3072x12288,
3072x3072 and 9216x3072 matrices, 0.26 GiB a block, ``--blocks`` of them):

- ``per tensor``: ``tensor.pin_memory()`` for each weight (a copy into PyTorch's pinned host allocator);
- ``one buffer per group``: ``torch.empty(group bytes, pin_memory=True)`` and each weight copied into a view;
- ``registered``: ``cudaHostRegister`` on each weight's own pageable memory (no copy, no new memory);
- ``ours``: what group offload does (:mod:`diffblocks.components.memory.pinned`): one buffer per
  group, exactly its size, mapped for it (huge pages asked for), locked with the driver, then each
  weight copied into a view; ``ours, 4 KiB pages`` without asking for huge pages.

Reported per way: seconds, GiB/s over the weights' bytes, the pinned host bytes PyTorch's pinned
allocator holds afterwards (``torch.cuda.host_memory_stats``, where this torch has it), and how
fast one group then copies to the device: tensor by tensor, and (for the ways with one buffer per
group) as one copy of the whole buffer. Run on a CUDA machine:
``python bench/pinning_gpu.py [--blocks 8]``; JSON goes to ``$OUT/pinning_gpu.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffblocks.components.memory import pinned  # noqa: E402
from diffblocks.components.memory.pinned import pack  # noqa: E402
from diffblocks.components.memory.slots import packed_bytes, packed_views  # noqa: E402

SHAPES = [(3072, 12288), (12288, 3072), (3072, 3072), (3072, 3072), (3072, 3072), (3072, 3072), (9216, 3072)]


def _block() -> list[torch.Tensor]:
    return [torch.empty(shape, dtype=torch.bfloat16).fill_(1.0) for shape in SHAPES]


def _host_bytes() -> int | None:
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None:
        return None
    return int(stats().get("allocated_bytes.current", stats().get("reserved_bytes.current", 0)))


def per_tensor(blocks: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [t.pin_memory() for block in blocks for t in block]


def one_buffer_per_group(blocks: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    homes = []
    for block in blocks:
        buffer = torch.empty(packed_bytes(block) or 0, dtype=torch.uint8, pin_memory=True)
        views = packed_views(buffer, block)
        for view, t in zip(views, block):
            view.copy_(t)
        homes += views
    return homes


def _register(tensor: torch.Tensor) -> None:
    code = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), 0)
    if int(code) != 0:
        raise RuntimeError(f"cudaHostRegister failed: {code}")


def ours(blocks: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """What group offload does: one buffer per group, exactly its size, locked with the driver."""
    homes = []
    for block in blocks:
        views, _buffer = pack(list(block), packed_bytes(block) or 0, lambda _i, _home: None)
        homes += views
    return homes


def ours_small_pages(blocks: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """As ``ours``, without asking the kernel for huge pages."""
    advice, pinned.HUGE_PAGES = pinned.HUGE_PAGES, None
    try:
        return ours(blocks)
    finally:
        pinned.HUGE_PAGES = advice


def registered(blocks: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    for block in blocks:
        for t in block:
            _register(t)
    return [t for block in blocks for t in block]


def _copy_speeds(group: list[torch.Tensor], *, flat: bool) -> tuple[float, float | None]:
    """GiB/s copying one group to the device on a side stream: tensor by tensor, and as one copy of its buffer."""
    nbytes = sum(t.numel() * t.element_size() for t in group)
    whole = group[0].untyped_storage().nbytes()  # a buffer per group: the group with its alignment padding
    device = torch.empty(max(nbytes, whole), dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()

    def timed(copy: Callable[[], None]) -> float:
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.cuda.stream(side):
                copy()
            side.synchronize()
            times.append(time.perf_counter() - start)
        return nbytes / 2**30 / statistics.median(times)

    def each() -> None:
        offset = 0
        for t in group:
            size = t.numel() * t.element_size()
            device[offset : offset + size].view(t.dtype).view(t.shape).copy_(t, non_blocking=True)
            offset += size

    def one_copy() -> None:
        source = torch.empty(0, dtype=torch.uint8).set_(group[0].untyped_storage())
        device[:whole].copy_(source, non_blocking=True)

    return timed(each), (timed(one_copy) if flat else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--name", default="pinning_gpu", help="the JSON file's name under $OUT")
    args = parser.parse_args()
    torch.cuda.init()
    results = []
    ways = (("per tensor", per_tensor), ("one buffer per group", one_buffer_per_group), ("registered", registered),
            ("ours", ours), ("ours, 4 KiB pages", ours_small_pages))
    for name, way in ways:
        blocks = [_block() for _ in range(args.blocks)]
        nbytes = sum(t.numel() * t.element_size() for block in blocks for t in block)
        before = _host_bytes()
        start = time.perf_counter()
        homes = way(blocks)
        seconds = time.perf_counter() - start
        assert all(t.is_pinned() for t in homes), name
        after = _host_bytes()
        held = after - before if after is not None and before is not None else None
        per_tensor_gib_s, flat_gib_s = _copy_speeds(homes[: len(SHAPES)], flat=name == "one buffer per group" or name.startswith("ours"))
        results.append({"way": name, "seconds": seconds, "gib": nbytes / 2**30, "gib_per_s": nbytes / 2**30 / seconds,
                        "pinned_bytes_added": held, "copy_per_tensor_gib_s": per_tensor_gib_s, "copy_flat_gib_s": flat_gib_s})
        print(f"| {name} | {nbytes / 2**30:.2f} GiB | {seconds:.2f} s | {nbytes / 2**30 / seconds:.2f} GiB/s | "
              f"{'-' if held is None else f'{held / 2**30:.2f} GiB'} | {per_tensor_gib_s:.1f} GiB/s | "
              f"{'-' if flat_gib_s is None else f'{flat_gib_s:.1f} GiB/s'} |", flush=True)
        if name.startswith("registered"):
            for t in homes:
                torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
        del homes, blocks
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        setting = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "blocks": args.blocks,
                   "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
        (Path(out) / f"{args.name}.json").write_text(json.dumps({"setting": setting, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
