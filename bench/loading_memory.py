"""Peak CPU memory while loading a UNet: read into memory, or straight into memory maps (disk offload).

Each load runs in a fresh process, which samples its anonymous memory (``RssAnon``, what the process
itself holds; a memory map's pages are the page cache's) every half millisecond; glibc returns
freed tensors to the system at once (``MALLOC_MMAP_THRESHOLD_``). The file is float16, so loading
as float32 casts every weight. Linux only.

    python bench/loading_memory.py                 # the mid-size UNet of tests/memory (68 MiB at float32)
    python bench/loading_memory.py --sd15          # SD 1.5's UNet (860 M parameters; 1.7 GB in memory at float32)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_PROBE = r"""
import sys, threading, time
import torch
from diffblocks.components.memory.disk import MemoryMap
from diffblocks.components.models.unet import UNet2DConditionModel

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024

folder, dtype, mode = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3]
memory_map = {"memory": None, "mapped": MemoryMap(aligned=False), "mapped+aligned": MemoryMap(folder=sys.argv[4])}[mode]
before = anon(); peak = [before]; done = [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], anon()); time.sleep(0.0005)
thread = threading.Thread(target=sample); thread.start()
start = time.perf_counter()
model = UNet2DConditionModel.from_pretrained(folder, dtype=dtype, memory_map=memory_map)
seconds = time.perf_counter() - start
done[0] = True; thread.join()
largest = max(t.numel() * t.element_size() for t in model.state_dict().values())
print(peak[0] - before, anon() - before, sum(t.numel() * t.element_size() for t in model.state_dict().values()), largest, seconds)
"""

MID = {"sample_size": 16, "block_out_channels": (128, 256), "layers_per_block": 2, "cross_attention_dim": 256,
       "attention_head_dim": 8, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
       "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}
SD15 = {"cross_attention_dim": 768}  # the rest are SD 1.5's, our params' defaults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd15", action="store_true", help="SD 1.5's UNet instead of the mid-size one")
    parser.add_argument("--folder", default=None, help="where the float16 file is written (default: a temporary folder)")
    args = parser.parse_args()
    import torch

    from diffblocks.components.models.unet import UNet2DConditionModel

    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        with torch.device("cpu"):
            UNet2DConditionModel.from_config(SD15 if args.sd15 else MID).to(torch.float16).save_pretrained(folder)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        print(f"torch {torch.__version__}, {'SD 1.5' if args.sd15 else 'mid-size'} UNet from a float16 safetensors file")
        print(f"| loads as | into | peak MiB | held after MiB | model MiB | largest tensor MiB | peak / model | seconds |")
        print("|---|---|---|---|---|---|---|---|")
        for dtype in ("float16", "float32"):
            for mode in ("memory", "mapped", "mapped+aligned"):
                done = subprocess.run([sys.executable, "-c", _PROBE, folder, dtype, mode, folder], capture_output=True,
                                      text=True, check=True, env=env)
                peak, held, size, largest, seconds = done.stdout.split()[-5:]
                mib = lambda n: f"{int(n) / 2**20:.1f}"  # noqa: E731
                print(f"| {dtype} | {mode} | {mib(peak)} | {mib(held)} | {mib(size)} | {mib(largest)} | "
                      f"{int(peak) / int(size):.2f} | {float(seconds):.2f} |")


if __name__ == "__main__":
    main()
