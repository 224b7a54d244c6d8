"""Out of memory during a call: the step is retried under a tighter plan, the run's state kept, and the image unchanged."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from diffblocks.blocks import Block, BlockIO, Pipeline
from diffblocks.components import ComponentsManager
from diffblocks.components.memory import (
    LADDER,
    GroupOffload,
    LeafOffload,
    ModelOffload,
    NoOffload,
    OffloadTightened,
    Placement,
    measure,
    plan_memory,
)
from diffblocks.presets.tiny.preset import builtin_model_dir

INPUTS: dict[str, Any] = dict(prompt="a small green cross in the center", num_inference_steps=3, progress=False)


def _failing(pipe: Pipeline, fail_on: set[int]) -> list[int]:
    """Make the UNet's forward raise a simulated out-of-memory error on the calls numbered in ``fail_on`` (from 1)."""
    calls: list[int] = []

    def hook(_module: torch.nn.Module, args: Any) -> None:
        calls.append(args[0].shape[0])
        if len(calls) in fail_on:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")

    pipe.components["unet"].register_forward_pre_hook(hook)
    return calls


def _image(pipe: Pipeline, **kwargs: Any) -> np.ndarray:
    return np.asarray(pipe(**INPUTS, **kwargs, generator=torch.Generator().manual_seed(0)).images[0])


@pytest.fixture(scope="module")
def unconstrained() -> np.ndarray:
    return _image(Pipeline.from_pretrained(builtin_model_dir()), guidance_batched=False)


@pytest.mark.parametrize("budget", [None, "1GiB"])
def test_out_of_memory_on_the_second_step_tightens_the_plan_and_the_image_stays(budget: str | None, unconstrained: np.ndarray) -> None:
    manager = ComponentsManager(device="cpu", memory_budget=budget)
    pipe = Pipeline.from_pretrained(builtin_model_dir(), manager=manager)
    calls = _failing(pipe, {3})  # guidance passes one by one: calls 1 and 2 are the first step, 3 fails in the second
    with pytest.warns(OffloadTightened, match=r"out of memory in block '[\w.]*denoise.predict' on cpu \(CUDA out of memory.*"
                                              r"offload policy NoOffload\(\) -> ModelOffload\(\).*the step runs again"):
        image = _image(pipe, guidance_batched=False)
    assert np.array_equal(image, unconstrained)
    assert len(calls) == 2 * 3 + 1  # the failed pass, then the second step again from its start: nothing lost, nothing run twice over
    assert manager.plan().policy == ModelOffload()


def test_batched_guidance_runs_one_pass_at_a_time_before_the_plan_tightens() -> None:
    manager = ComponentsManager(device="cpu")
    pipe = Pipeline.from_pretrained(builtin_model_dir(), manager=manager)
    calls = _failing(pipe, {1, 2})  # the batched forward, then its first pass alone
    with pytest.warns(OffloadTightened, match=r"NoOffload\(\) -> ModelOffload\(\)"):
        _image(pipe)
    assert calls[:4] == [2, 1, 1, 1]  # batched, then one by one (fails), then one by one under the tighter plan
    assert set(calls[4:]) == {1} and manager.plan().policy == ModelOffload()


@pytest.mark.parametrize("manager", [dict(device="cpu", offload=LeafOffload()), dict()], ids=["leaf-offload", "no-device"])
def test_out_of_memory_with_nothing_cheaper_left_is_raised_and_says_so(manager: dict[str, Any]) -> None:
    pipe = Pipeline.from_pretrained(builtin_model_dir(), manager=ComponentsManager(**manager))
    _failing(pipe, {2})
    with pytest.raises(torch.OutOfMemoryError, match=r"simulated\) \(in block '[\w.]*denoise.predict'; no cheaper placement is left"):
        _image(pipe, guidance_batched=False)


@pytest.mark.parametrize(
    ("current", "expected"),
    [(None, ModelOffload()), (NoOffload(), ModelOffload()), (ModelOffload(), GroupOffload(1)),
     (GroupOffload(1), GroupOffload(1, prefetch=False)), (GroupOffload(1, prefetch=False), LeafOffload()), (LeafOffload(), None),
     (GroupOffload(4), GroupOffload(1))],  # off the ladder: the first rung that needs less
)
def test_each_policy_tightens_to_the_next_that_needs_less(current: object, expected: object) -> None:
    placement = Placement(policy=current)  # type: ignore[arg-type]
    if current is not None:
        toy = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(8)))
        placement.make_plan(lambda: {"toy": measure(toy)}, torch.device("cpu"))
    assert placement.tighter() == expected
    if expected is not None and current is not None:
        size = measure(toy)
        assert expected in LADDER and plan_memory({"toy": size}, device="cpu", policy=expected).peak <= current.peak([size])  # type: ignore[attr-defined]


def test_blocks_kept_in_a_spare_budget_are_streamed_first(unconstrained: np.ndarray) -> None:
    manager = ComponentsManager(device="cpu", memory_budget="85MiB")  # group offload needs 78.7 MiB: 6.3 MiB of blocks stay
    pipe = Pipeline.from_pretrained(builtin_model_dir(), manager=manager)
    assert manager.plan().policy == GroupOffload(1) and manager.plan().kept
    _failing(pipe, {3})
    with pytest.warns(OffloadTightened, match=r"GroupOffload\(blocks_per_group=1\) -> GroupOffload\(blocks_per_group=1\), its kept blocks streamed too"):
        image = _image(pipe, guidance_batched=False)
    assert np.array_equal(image, unconstrained)
    assert manager.plan().policy == GroupOffload(1) and manager.plan().kept == {}


class DrawThenRun(Block):
    """Draws noise from the call's generator, then runs a model that may run out of memory."""

    class Inputs(BlockIO):
        generator: torch.Generator | list[torch.Generator]

    class Outputs(BlockIO):
        images: torch.Tensor

    def __init__(self, fail_first: int) -> None:
        super().__init__()
        self.fail_first = fail_first

    def __call__(self, inputs: Inputs) -> Outputs:
        generators = inputs.generator if isinstance(inputs.generator, list) else [inputs.generator]
        noise = torch.stack([torch.randn(4, generator=g) for g in generators])
        if self.fail_first > 0:  # the model runs after the draw
            self.fail_first -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")
        return self.Outputs(images=noise)


@pytest.mark.parametrize("per_image", [False, True])
def test_a_retried_step_draws_the_same_noise_as_a_step_run_once(per_image: bool) -> None:
    def generator() -> torch.Generator | list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in (0, 1)] if per_image else torch.Generator().manual_seed(0)

    once = Pipeline(DrawThenRun(fail_first=0), manager=ComponentsManager(device="cpu"))(generator=generator(), progress=False).images
    pipe = Pipeline(DrawThenRun(fail_first=1), manager=ComponentsManager(device="cpu"))
    with pytest.warns(OffloadTightened, match="the step runs again"):
        retried = pipe(generator=generator(), progress=False).images
    assert torch.equal(retried, once)
