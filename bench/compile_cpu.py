"""Compile time and denoiser step time on the CPU: eager vs regional vs full ``torch.compile``, built-in tiny model.

Each mode runs in a fresh process with an empty inductor cache, so "compile" is a cold first call
(tracing, inductor code generation and the C++ compiler), as a user meets it. A step is one UNet
call on a classifier-free guidance batch (2 x 4 x 16 x 16 latents, the model's 64 x 64 pixels);
"step" is the median of ``--repeats`` calls after the first, each timed beside a call of an eager
copy of the model (the eager column), so that a shared machine's load hits both alike. Every
mode's prediction is compared with eager's. Torch runs on one thread by default (see bench/sd_pipeline_cpu.py for why).
Run from the repository root: python bench/compile_cpu.py [--repeats 30] [--threads 1] [--modes eager regional full]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 16, 384, generator=generator)  # all-MiniLM-L6-v2 token embeddings
    return latents, torch.tensor([500.0, 500.0]), context


def run_mode(mode: str, repeats: int, compile_kwargs: dict[str, object]) -> dict[str, object]:
    """Time one mode in this process: its first call (compiling), then its steady step beside eager's.

    The eager model is a copy of the compiled one, and the two are called in turn, so that load on a
    shared machine slows both alike.
    """
    from diffblocks.blocks import Pipeline
    from diffblocks.presets.tiny.preset import builtin_model_dir

    pipe = Pipeline.from_pretrained(str(builtin_model_dir()))
    unet = pipe.components["unet"].eval()
    eager = copy.deepcopy(unet)
    latents, t, context = inputs()
    if mode != "eager":
        pipe.compile(regional=mode == "regional", **compile_kwargs)
    with torch.inference_mode():
        reference = eager(latents, t, context)
        start = time.perf_counter()
        first = unet(latents, t, context)
        first_call = time.perf_counter() - start
        times: dict[str, list[float]] = {"ours": [], "eager": []}
        for _ in range(repeats):
            for name, model in (("ours", unet), ("eager", eager)):
                start = time.perf_counter()
                model(latents, t, context)
                times[name].append(time.perf_counter() - start)
    return {
        "mode": mode,
        "first_call_s": first_call,
        "step_ms": statistics.median(times["ours"]) * 1e3,
        "eager_step_ms": statistics.median(times["eager"]) * 1e3,
        "max_abs_diff": float((first - reference).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=["eager", "regional", "full"])
    parser.add_argument("--dynamic", choices=["auto", "true", "false"], default="auto", help="torch.compile's dynamic")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    compile_kwargs = {} if args.dynamic == "auto" else {"dynamic": args.dynamic == "true"}
    if args.child:
        print(json.dumps(run_mode(args.child, args.repeats, compile_kwargs)))
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(f"dynamic={args.dynamic}; steps are medians of {args.repeats}, each beside an eager step of the same moment")
    print(f"{'mode':<9} {'first call (s)':>15} {'step (ms)':>10} {'eager (ms)':>11} {'max |diff| vs eager':>20}")
    for mode in args.modes:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": str(ROOT)}
            command = [sys.executable, __file__, "--child", mode, "--repeats", str(args.repeats),
                       "--threads", str(args.threads), "--dynamic", args.dynamic]  # fmt: skip
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        first, step, eager, diff = row["first_call_s"], row["step_ms"], row["eager_step_ms"], row["max_abs_diff"]
        print(f"{mode:<9} {first:>15.2f} {step:>10.2f} {eager:>11.2f} {diff:>20.1e}")


if __name__ == "__main__":
    main()
