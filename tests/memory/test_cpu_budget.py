"""A CPU memory budget: what does not fit CPU memory waits in memory-mapped files, and the plan says so."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffblocks.components.memory import (
    ByteSize,
    DiskOffload,
    GroupOffload,
    LeafOffload,
    MemoryBudgetError,
    ModelOffload,
    NoOffload,
    plan_memory,
)
from diffblocks.components.memory.planner import host_peak
from tests.memory.test_planner import FLUX


# Flux.1-dev: 31.5 GiB of weights, the transformer 22.2 GiB of them
@pytest.mark.parametrize(
    ("budget", "cpu_budget", "expected", "instead"),
    [
        (None, "64GiB", NoOffload(), None),               # every model on the device; the largest loads through CPU memory
        ("80GiB", "24GiB", NoOffload(), None),
        ("24GiB", "64GiB", ModelOffload(), None),         # homes of 31.5 GiB fit 64 GiB of CPU memory
        ("24GiB", "24GiB", DiskOffload(1), ModelOffload()),  # they do not fit 24: the home is the file instead
        ("12GiB", "32GiB", GroupOffload(1), None),
        ("12GiB", "23GiB", DiskOffload(1), GroupOffload(1)),
        ("2.1GiB", "23GiB", DiskOffload(1, prefetch=False), GroupOffload(1, prefetch=False)),
        ("1.5GiB", "23GiB", DiskOffload(leaf=True), LeafOffload()),  # no group fits beside the rest: a layer at a time
    ],
)
def test_policies_whose_homes_do_not_fit_cpu_memory_go_to_disk(
    budget: str | None, cpu_budget: str, expected: object, instead: object
) -> None:
    plan = plan_memory(FLUX, device="cuda", budget=ByteSize.parse(budget) if budget else None, cpu_budget=ByteSize.parse(cpu_budget))
    assert (plan.policy, plan.instead) == (expected, instead)
    assert plan.host is not None and plan.host <= ByteSize.parse(cpu_budget)
    assert budget is None or plan.peak <= ByteSize.parse(budget)
    assert f"-> {expected!r}" in str(plan) and f"CPU budget {ByteSize.parse(cpu_budget)}" in str(plan)
    if instead is not None:
        assert f"{instead!r} fits cuda but keeps 31.5 GiB of weights in CPU memory" in str(plan)


def test_host_memory_of_each_policy() -> None:
    models = list(FLUX.values())
    total, largest = sum(m.total for m in models), FLUX["transformer"].total
    assert [host_peak(p, models) for p in (NoOffload(), ModelOffload(), GroupOffload(1), LeafOffload(), DiskOffload(1))] == [
        largest, total, total, total, largest]


def test_a_cpu_budget_below_the_largest_model_says_the_minimum() -> None:
    with pytest.raises(MemoryBudgetError, match=r"cpu_memory_budget 16.0 GiB is below 22.2 GiB, the size of the largest model \(transformer\)"):
        plan_memory(FLUX, device="cuda", budget=ByteSize.parse("12GiB"), cpu_budget=ByteSize.parse("16GiB"))


def test_a_fixed_policy_over_the_cpu_budget_is_refused() -> None:
    with pytest.raises(MemoryBudgetError, match=r"offload=ModelOffload\(\) keeps 31.5 GiB of weights in CPU memory"):
        plan_memory(FLUX, device="cuda", policy=ModelOffload(), cpu_budget=ByteSize.parse("24GiB"))
    assert plan_memory(FLUX, device="cuda", policy=DiskOffload(2), cpu_budget=ByteSize.parse("24GiB")).policy == DiskOffload(2)


def test_below_the_largest_layer_no_placement_fits_with_a_cpu_budget_either() -> None:
    with pytest.raises(MemoryBudgetError, match=r"LeafOffload\(\) needs at least 235.5 MiB"):
        plan_memory(FLUX, device="cuda", budget=ByteSize.parse("200MiB"), cpu_budget=ByteSize.parse("23GiB"))


def test_a_manager_under_a_cpu_budget_maps_its_models_and_makes_the_same_image() -> None:
    from diffblocks.blocks import Pipeline
    from diffblocks.components import ComponentsManager
    from diffblocks.presets.tiny.preset import builtin_model_dir

    manager = ComponentsManager(device="cpu", memory_budget="120MiB", cpu_memory_budget="100MiB")
    pipe = Pipeline.from_pretrained(builtin_model_dir(), manager=manager)
    plan = manager.plan()
    assert plan.policy == DiskOffload(1) and plan.instead == ModelOffload()
    assert not any(row.loaded for row in manager.table())  # planned from the headers, before loading
    kwargs = {"prompt": "a small green cross in the center", "num_inference_steps": 3, "progress": False}
    image = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    plain = Pipeline.from_pretrained(builtin_model_dir())(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(plain))


def test_a_manager_refuses_a_cpu_budget_below_what_loading_needs_before_loading() -> None:
    from diffblocks.blocks import Pipeline
    from diffblocks.components import ComponentsManager
    from diffblocks.presets.tiny.preset import builtin_model_dir

    # every model loads straight into memory maps under disk offload: the least is the largest tensor made while loading
    manager = ComponentsManager(device="cpu", cpu_memory_budget="20MiB")
    pipe = Pipeline.from_pretrained(builtin_model_dir(), manager=manager)
    with pytest.raises(MemoryBudgetError, match=r"below 44.7 MiB, the largest tensor of text_encoder, which is made in CPU memory"):
        pipe(prompt="a cross", num_inference_steps=1, progress=False)
    assert not any(row.loaded for row in manager.table())
    with pytest.raises(ValueError, match="is not a size"):
        ComponentsManager(device="cpu", cpu_memory_budget="lots")


def test_disk_offload_tightens_to_one_group_then_one_layer_at_a_time_and_no_further() -> None:
    from diffblocks.components.memory import Placement

    placement = Placement(policy=DiskOffload(1))
    placement.make_plan(lambda: dict(FLUX), torch.device("cpu"))
    assert placement.tighter() == DiskOffload(1, prefetch=False)
    placement.tighten(DiskOffload(1, prefetch=False))
    placement.make_plan(lambda: dict(FLUX), torch.device("cpu"))
    assert placement.tighter() == DiskOffload(leaf=True)
    placement.tighten(DiskOffload(leaf=True))
    placement.make_plan(lambda: dict(FLUX), torch.device("cpu"))
    assert placement.tighter() is None  # the rungs below keep their homes in CPU memory



@pytest.mark.parametrize(("cpu_budget", "expected"), [("64GiB", ModelOffload()), ("24GiB", DiskOffload(1))])
def test_under_a_cpu_budget_a_tighter_rung_whose_homes_do_not_fit_becomes_disk_offload(cpu_budget: str, expected: object) -> None:
    from diffblocks.components.memory import Placement

    placement = Placement(policy=NoOffload(), cpu_budget=cpu_budget)  # NoOffload holds the largest model: 22.2 GiB
    placement.make_plan(lambda: dict(FLUX), torch.device("cpu"))
    assert placement.tighter() == expected  # ModelOffload keeps all 31.5 GiB at home
