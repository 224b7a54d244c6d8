"""Whole-call time on the CPU: our SD 1.5 and SDXL text2img presets vs diffusers' pipelines, tiny random weights.

Both pipelines load the same tiny diffusers repository (saved by the test fixtures), get the same
inputs and seed, and are called alternately in one process so that load on a shared machine hits
both alike. Prints the median of each and the ratio ours / diffusers (below 1: ours is faster).
Torch runs on one thread by default: on a shared 2-core machine, two threads that wait on each
other while another process holds a core make tiny ops 10-100x slower and the timings meaningless.
Run from the repository root: python bench/sd_pipeline_cpu.py [--repeats 15] [--steps 10] [--size 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' fixtures build the tiny repositories

from diffblocks.blocks import Pipeline  # noqa: E402
from tests.presets.sd_fixtures import tiny_sd15, tiny_sdxl  # noqa: E402


def reference(family: str, repo: Path) -> Any:
    import diffusers

    if family == "sd15":
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(repo, safety_checker=None)
    else:
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(repo, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def median_times(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call, calling each function in turn so drifting load affects all alike."""
    for call in calls.values():
        call()  # warm-up: lazy imports, allocator, first-call caches
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bench(family: str, repo: Path, *, steps: int, size: int, repeats: int) -> dict[str, float]:
    ours, theirs = Pipeline.from_pretrained(str(repo)), reference(family, repo)
    inputs = dict(prompt="a red circle", negative_prompt="blurry", height=size, width=size, num_inference_steps=steps, guidance_scale=5.0)

    def run_ours() -> Any:
        return ours(**inputs, generator=torch.Generator().manual_seed(0), output_type="np", progress=False).images

    def run_theirs() -> Any:
        return theirs(**inputs, generator=torch.Generator().manual_seed(0), output_type="np").images

    difference = abs(run_ours() - run_theirs()).max()
    medians = median_times({"ours": run_ours, "diffusers": run_theirs}, repeats)
    return {**medians, "ratio": medians["ours"] / medians["diffusers"], "max_abs_diff": float(difference)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, {args.size}x{args.size}")
    with tempfile.TemporaryDirectory() as folder:
        for family, make in (("sd15", tiny_sd15), ("sdxl", tiny_sdxl)):
            row = bench(family, make(Path(folder) / family), steps=args.steps, size=args.size, repeats=args.repeats)
            print(
                f"{family} text2img: ours {row['ours'] * 1e3:.1f} ms, diffusers {row['diffusers'] * 1e3:.1f} ms, "
                f"ratio {row['ratio']:.3f} (max |ours - diffusers| = {row['max_abs_diff']:.1e})"
            )


if __name__ == "__main__":
    main()
