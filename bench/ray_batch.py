"""Batch generation on Ray Data against a plain loop in one process (CPU, the built-in tiny model).

The plain loop loads a ``RequestRunner`` once and makes each row's image and writes its PNG, on one
torch thread. The Ray path is ``generate_batch`` on a local cluster of ``--cpus`` CPUs with 1 and 2
workers (one CPU, one torch thread each). Each configuration runs a short and a long batch of rows;
the slope between them is the steady per-image time (what a row costs once the workers are up), and
the rest is the fixed cost (actors started, model loaded once per worker, the dataset planned). The
per-image overhead of the Ray path is its 1-worker slope minus the plain loop's per-image time.
Configurations run in turn, ``--repeats`` rounds; medians are reported.
Run from the repository root: python bench/ray_batch.py [--repeats 3] [--short 8] [--long 40]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SETTINGS = {"height": 32, "width": 32, "num_inference_steps": 2}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--short", type=int, default=8)
    parser.add_argument("--long", type=int, default=40)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray
    import torch

    from diffblocks.presets.tiny import EVAL_PROMPTS
    from diffblocks.scale import GenerationRequest, RequestRunner, generate_batch

    torch.set_num_threads(1)
    prompts = [EVAL_PROMPTS[k % len(EVAL_PROMPTS)] for k in range(args.long)]
    runner = RequestRunner.load(device="cpu")
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)

    def plain(count: int) -> float:
        folder = Path(tempfile.mkdtemp())
        started = time.perf_counter()
        for k, prompt in enumerate(prompts[:count]):
            (image,) = runner.images(GenerationRequest(prompt=prompt, seed=k, **SETTINGS))
            image.save(folder / f"{k:06d}-0.png")
        return time.perf_counter() - started

    def on_ray(count: int, workers: int) -> float:
        started = time.perf_counter()
        summary = generate_batch(prompts[:count], tempfile.mkdtemp(), workers=workers, batch_size=4, progress=False, **SETTINGS)
        assert summary.images == count
        return time.perf_counter() - started

    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "ray, 1 worker": [], "ray, 2 workers": []}
    for round_ in range(args.repeats):
        runs["plain"].append((plain(args.short), plain(args.long)))
        for workers in (1, 2):
            runs[f"ray, {workers} worker{'s' if workers > 1 else ''}"].append((on_ray(args.short, workers), on_ray(args.long, workers)))
        print(f"round {round_ + 1}/{args.repeats} done", flush=True)
    ray.shutdown()

    extra = args.long - args.short
    per_image = {name: statistics.median((long - short) / extra for short, long in pairs) for name, pairs in runs.items()}
    fixed = {name: statistics.median(short - args.short * per_image[name] for short, _ in pairs) for name, pairs in runs.items()}
    print(f"{args.short} and {args.long} rows, {SETTINGS}, medians of {args.repeats}")
    print("| path | per image (steady) | images/s (steady) | fixed cost per run | x plain loop's images/s |")
    print("|---|---|---|---|---|")
    for name in runs:
        speed = 1 / per_image[name]
        print(f"| {name} | {per_image[name] * 1000:.0f} ms | {speed:.2f} | {fixed[name]:.1f} s | {speed * per_image['plain']:.2f} |")
    overhead = per_image["ray, 1 worker"] - per_image["plain"]
    print(f"Ray path overhead per image (1 worker minus plain): {overhead * 1000:.0f} ms ({overhead / per_image['plain']:+.0%})")


if __name__ == "__main__":
    main()
