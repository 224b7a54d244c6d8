"""Batch generation on Ray Data against a plain loop in one process (CPU, the built-in tiny model).

The plain loop loads a ``RequestRunner`` once, then makes each row's image and writes its PNG, on one
torch thread. The Ray path runs the rows through ``generate_batch``'s Ray Data pipeline on a local
cluster of ``--cpus`` CPUs with 1 and 2 workers (one CPU and one torch thread each), batches of
``--batch-size`` rows. Its steady rate is timed on the driver from the first batch's records to the
last's (the workers are up and their model loaded), so it holds everything a row costs on the Ray
path: dispatch, the actor call, the PNG, the records back to the driver and the manifest part. The
fixed cost is the rest of the run (the workers started and the model loaded once each). The
per-image overhead of the Ray path is its 1-worker steady time per image minus the plain loop's.
Configurations run in turn, ``--repeats`` rounds; medians are reported.
Run from the repository root: python bench/ray_batch.py [--repeats 3] [--rows 48]
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
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray
    import torch

    from diffblocks.presets.tiny import EVAL_PROMPTS
    from diffblocks.scale import RequestRunner
    from diffblocks.scale.batch import _run
    from diffblocks.scale.rows import read_rows

    torch.set_num_threads(1)
    rows = read_rows([EVAL_PROMPTS[k % len(EVAL_PROMPTS)] for k in range(args.rows)], SETTINGS)
    runner = RequestRunner.load(device="cpu")
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)

    def plain() -> tuple[float, float]:
        folder = Path(tempfile.mkdtemp())
        started = time.perf_counter()
        for row in rows:
            assert row.request is not None
            (image,) = runner.images(row.request)
            image.save(folder / f"{row.index:06d}-0.png")
        seconds = time.perf_counter() - started
        return seconds / len(rows), seconds

    def on_ray(workers: int) -> tuple[float, float]:
        started = time.perf_counter()
        arrivals: list[tuple[float, int]] = []
        batches = _run(
            ray, rows, output=Path(tempfile.mkdtemp()), model=None, loader=None, workers=workers,
            batch_size=args.batch_size, device="cpu", cpus_per_worker=1.0, retries=0, progress=False,
        )
        for records in batches:
            arrivals.append((time.perf_counter(), len(records)))
        assert sum(count for _, count in arrivals) == len(rows)
        steady = (arrivals[-1][0] - arrivals[0][0]) / (len(rows) - arrivals[0][1])
        return steady, time.perf_counter() - started

    names = ("plain loop", "ray, 1 worker", "ray, 2 workers")
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for round_ in range(args.repeats):
        runs[names[0]].append(plain())
        runs[names[1]].append(on_ray(1))
        runs[names[2]].append(on_ray(2))
        print(f"round {round_ + 1}/{args.repeats}: " + ", ".join(f"{n} {runs[n][-1][0] * 1000:.0f} ms" for n in names), flush=True)
    ray.shutdown()

    per_image = {name: statistics.median(steady for steady, _ in pairs) for name, pairs in runs.items()}
    wall = {name: statistics.median(total for _, total in pairs) for name, pairs in runs.items()}
    print(f"{args.rows} rows, batches of {args.batch_size}, {SETTINGS}, medians of {args.repeats}")
    print("| path | per image (steady) | images/s (steady) | x plain loop | whole run (start-up included) |")
    print("|---|---|---|---|---|")
    for name in names:
        speed = 1 / per_image[name]
        print(f"| {name} | {per_image[name] * 1000:.0f} ms | {speed:.2f} | {per_image['plain loop'] / per_image[name]:.2f} | {wall[name]:.1f} s |")
    overhead = per_image["ray, 1 worker"] - per_image["plain loop"]
    print(f"Ray path overhead per image (1 worker minus plain loop): {overhead * 1000:.0f} ms ({overhead / per_image['plain loop']:+.0%})")


if __name__ == "__main__":
    main()
