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
