"""Executor overhead on the CPU: our pipeline vs a plain Python loop making the same calls.

No-op blocks isolate what the executor adds: per loop iteration (input construction, state
updates, the loop itself) and per call (input validation, workflow selection, binding).
Run: python bench/executor_overhead.py [--steps 50] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from diffblocks.blocks import Block, BlockIO, Float, Loop, Pipeline, Sequence


class Timesteps(Block):
    class Inputs(BlockIO):
        num_inference_steps: int = 50

    class Outputs(BlockIO):
        timesteps: Any

    def __call__(self, inputs: Inputs) -> Outputs:
        return self.Outputs(timesteps=list(range(inputs.num_inference_steps)))


class Latents(Block):
    class Inputs(BlockIO):
        height: int = 64

    class Outputs(BlockIO):
        latents: Float["batch channels height width"]

    def __call__(self, inputs: Inputs) -> Outputs:
        return self.Outputs(latents=LATENTS)


class ScaleInput(Block):
    class Inputs(BlockIO):
        latents: Float["batch channels height width"]
        t: Any

    class Outputs(BlockIO):
        model_input: Float["batch channels height width"]

    def __call__(self, inputs: Inputs) -> Outputs:
        return self.Outputs(model_input=inputs.latents)


class Predict(Block):
    class Inputs(BlockIO):
        model_input: Float["batch channels height width"]
        t: Any
        guidance_scale: float = 5.0

    class Outputs(BlockIO):
        noise_pred: Float["batch channels height width"]

    def __call__(self, inputs: Inputs) -> Outputs:
        return self.Outputs(noise_pred=inputs.model_input)


class SchedulerStep(Block):
    class Inputs(BlockIO):
        latents: Float["batch channels height width"]
        noise_pred: Float["batch channels height width"]
        step_index: int

    class Outputs(BlockIO):
        latents: Float["batch channels height width"]

    def __call__(self, inputs: Inputs) -> Outputs:
        return self.Outputs(latents=inputs.latents)


class Decode(Block):
    class Inputs(BlockIO):
        latents: Float["batch channels height width"]

    class Outputs(BlockIO):
        images: Float["batch channels height width"]

    def __call__(self, inputs: Inputs) -> Outputs:
        return self.Outputs(images=inputs.latents)


LATENTS = torch.zeros(1, 4, 8, 8)


def hand_written(steps: int) -> torch.Tensor:
    """The same calls without the executor: what a plain loop costs."""
    timesteps = list(range(steps))
    latents = LATENTS
    for i, t in enumerate(timesteps):
        model_input = latents
        noise_pred = model_input
        latents = latents if i >= 0 and noise_pred is not None and t is not None else latents
    return latents


def median_seconds(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    loop = Loop(ScaleInput(), Predict(), SchedulerStep(), name="denoise")
    pipe = Pipeline(Sequence(Timesteps(), Latents(), loop, Decode(), name="noop"))
    for _ in range(3):
        pipe(num_inference_steps=args.steps, progress=False)
        hand_written(args.steps)

    def ours(steps: int, progress: bool = False) -> Any:
        return lambda: pipe(num_inference_steps=steps, progress=progress)

    # per call: a 1-step run; per step: the slope between a long and a 1-step run
    one = median_seconds(ours(1), args.repeats * 4)
    one_bar = median_seconds(ours(1, progress=True), args.repeats * 4)
    many = median_seconds(ours(args.steps), args.repeats)
    many_bar = median_seconds(ours(args.steps, progress=True), args.repeats)
    ref_one = median_seconds(lambda: hand_written(1), args.repeats * 4)
    ref_many = median_seconds(lambda: hand_written(args.steps), args.repeats)
    per_step = ((many - one) - (ref_many - ref_one)) / (args.steps - 1)
    per_step_bar = ((many_bar - one_bar) - (ref_many - ref_one)) / (args.steps - 1)
    fixed = one - ref_one - per_step
    print(f"torch {torch.__version__}, {args.steps} steps, 3 blocks in the loop, median of {args.repeats}")
    print(f"plain loop, {args.steps} steps:     {ref_many * 1e6:9.1f} us")
    print(f"pipeline, {args.steps} steps:       {many * 1e6:9.1f} us  (ratio {many / ref_many:.1f}x)")
    print(f"overhead per loop iteration: {per_step * 1e6:9.2f} us  (budget 20 us)")
    print(f"  with the progress bar:     {per_step_bar * 1e6:9.2f} us")
    print(f"overhead per call:           {fixed * 1e6:9.1f} us  (budget 1000 us)")


if __name__ == "__main__":
    main()
