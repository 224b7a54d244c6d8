"""Budgets measured from the machine: "auto" takes 90% of what the device (or the CPU) has free when the manager is made."""

from __future__ import annotations

import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.components import ComponentsManager
from diffblocks.components.memory import NoOffload
from diffblocks.components.memory.free import FREE, measured_budget
from diffblocks.presets.tiny.preset import builtin_model_dir

GiB = 2**30


def test_auto_budgets_take_nine_tenths_of_what_is_free_when_the_manager_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    free = [10 * GiB]
    monkeypatch.setitem(FREE, "cpu", lambda _device: free[0])
    manager = ComponentsManager(device="cpu", memory_budget="auto", cpu_memory_budget="AUTO")
    assert manager.placement.budget == manager.placement.cpu_budget == 9 * GiB
    Pipeline.from_pretrained(builtin_model_dir(), manager=manager)
    free[0] = GiB  # measured once: the manager's own models do not shrink its budget
    plan = manager.plan()
    assert plan.policy == NoOffload() and "(budget 9.0 GiB)" in str(plan)


def test_a_cuda_budget_reads_the_free_memory_of_that_device(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (asked.append(device), (20 * GiB, 80 * GiB))[1])
    assert measured_budget(torch.device("cuda:1")) == 18 * GiB and asked == [torch.device("cuda:1")]


def test_auto_where_free_memory_cannot_be_read_says_to_give_a_size() -> None:
    with pytest.raises(ValueError, match=r"memory budget 'auto' cannot read the free memory of meta: give the budget as a size"):
        ComponentsManager(device="meta", memory_budget="auto")
    with pytest.raises(ValueError, match="is not a size"):
        ComponentsManager(device="cpu", memory_budget="automatic")


def test_auto_measured_again_by_place_counts_the_managers_own_loaded_models_as_free(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(FREE, "cpu", lambda _device: 10 * GiB)  # what the machine reports, the loaded models already taken
    manager = ComponentsManager(device="cpu")
    model = torch.nn.Linear(1024, 1024)  # 4.0 MiB
    manager.get(manager.add("proj", model))
    tied = manager.add("again", model)  # the same storages under a second name count once
    manager.place(memory_budget="auto", cpu_memory_budget="auto")
    own = 1024 * 1025 * 4
    assert manager.placement.budget == manager.placement.cpu_budget == int((10 * GiB + own) * 0.9)
    assert manager.get(tied) is model


def test_a_model_under_two_names_is_placed_once() -> None:
    from diffblocks.components.memory import GroupOffload
    from tests.memory.test_policies import Toy

    moves: list[str] = []
    manager = ComponentsManager(device="cpu", offload=GroupOffload(1), on_move=lambda name, device, size: moves.append(name))
    model = Toy()
    manager.add("a", model)
    manager.add("b", model)
    manager.get("a")
    manager.get("b")
    assert len(model._forward_pre_hooks) == 1 and len(model.blocks[0]._forward_pre_hooks) == 1
    moves.clear()
    model(torch.ones(1, 4))
    assert moves == [f"a/blocks.{i}" for i in range(4) for _ in range(2)]  # each block in and home, once
