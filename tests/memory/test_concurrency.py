"""Calls in two threads sharing offloaded models: nothing a running forward reads moves under it.

The device stand-in is the mover's ``on_move``: every move is checked against what the threads are
running at that moment (marked by hooks inside the policy's own), and a move of a model, group or
layer that a forward is still in is a failure. Each forward sleeps, so the threads interleave.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from torch import nn

from diffblocks.components.memory import GroupOffload, LeafOffload, ModelOffload, Mover
from diffblocks.components.memory.policies import AbstractOffload

CALLS = 12


class SlowLinear(nn.Linear):
    """A layer that takes long enough for the other thread to run meanwhile (sleeping releases the GIL)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.002)
        return super().forward(x)


class Stack(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.proj = SlowLinear(4, 4)
        self.blocks = nn.ModuleList(SlowLinear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for block in self.blocks:
            x = block(x)
        return x


class Watch:
    """What each thread is inside now, by the names moves are reported under; a move of one of them is a violation."""

    def __init__(self) -> None:
        self.inside: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.violations: list[str] = []
        self.moves = 0

    def mark(self, module: nn.Module, name: str) -> None:
        def enter(_m: nn.Module, _a: object) -> None:
            with self.lock:
                self.inside[name] += 1

        def leave(_m: nn.Module, _a: object, _o: object) -> None:
            with self.lock:
                self.inside[name] -= 1

        module.register_forward_pre_hook(enter)  # after the policy's: it runs once the weights are in
        module.register_forward_hook(leave, prepend=True, always_call=True)  # before the policy's: before they may go

    def on_move(self, name: str, device: torch.device, size: int) -> None:
        with self.lock:
            self.moves += 1
            if self.inside[name] > 0:
                self.violations.append(f"{name} moved to {device} while a forward was in it")


def _run_in_threads(jobs: list[Callable[[], None]]) -> list[BaseException]:
    errors: list[BaseException] = []

    def run(job: Callable[[], None]) -> None:
        try:
            for _ in range(CALLS):
                job()
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "the threads deadlocked"
    return errors


def _job(model: nn.Module, expected: torch.Tensor, x: torch.Tensor) -> Callable[[], None]:
    def job() -> None:
        with torch.no_grad():
            assert torch.equal(model(x), expected)

    return job


def test_model_offload_never_sends_home_a_model_another_call_is_running() -> None:
    watch = Watch()
    mover = Mover("cpu", on_move=watch.on_move)
    models = {"a": Stack(0), "b": Stack(1)}
    x = torch.ones(1, 4)
    with torch.no_grad():
        expected = {name: model(x) for name, model in models.items()}
    for name, model in models.items():
        ModelOffload().attach(name, model, mover)
        watch.mark(model, name)
    errors = _run_in_threads([_job(models[name], expected[name], x) for name in models])
    assert not errors and not watch.violations, (errors, watch.violations[:3])
    assert watch.moves >= 2 and not mover.users  # the calls took turns, and every pin was released


def test_model_offload_a_thread_in_one_model_may_run_another_inside_it() -> None:
    watch = Watch()
    mover = Mover("cpu", on_move=watch.on_move)
    inner = Stack(1)

    class Outer(Stack):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return inner(super().forward(x))  # a second model inside the first's forward: it cannot wait for itself

    outer = Outer(0)
    x = torch.ones(1, 4)
    with torch.no_grad():
        expected = outer(x)
    ModelOffload().attach("outer", outer, mover)
    ModelOffload().attach("inner", inner, mover)
    watch.mark(outer, "outer")
    errors = _run_in_threads([_job(outer, expected, x), _job(inner, inner(x).detach(), x)])
    assert not errors and not watch.violations, (errors, watch.violations[:3])
    assert not mover.users


@pytest.mark.parametrize("policy", [GroupOffload(1), GroupOffload(1, prefetch=False), LeafOffload()], ids=["group", "group-one", "leaf"])
def test_streamed_tensors_stay_while_another_call_runs_them(policy: AbstractOffload) -> None:
    watch = Watch()
    mover = Mover("cpu", on_move=watch.on_move)
    model = Stack(0)
    x = torch.ones(1, 4)
    with torch.no_grad():
        expected = model(x)
    policy.attach("m", model, mover)
    for name, sub in model.named_modules():
        if isinstance(policy, LeafOffload) and isinstance(sub, nn.Linear):
            watch.mark(sub, f"m/{name}")
        elif name.startswith("blocks.") and name.count(".") == 1:
            watch.mark(sub, f"m/{name}")  # a group of one block is reported under the block's name
    errors = _run_in_threads([_job(model, expected, x), _job(model, expected, x)])
    assert not errors and not watch.violations, (errors, watch.violations[:3])
    assert not mover.users


@pytest.mark.parametrize("policy", [ModelOffload(), GroupOffload(1), LeafOffload()], ids=["model", "group", "leaf"])
def test_a_failed_forward_releases_what_it_held(policy: AbstractOffload) -> None:
    mover = Mover("cpu")
    model = Stack(0)
    attached = policy.attach("m", model, mover)

    def simulated_oom(_module: nn.Module, _args: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    failing = model.blocks[1].register_forward_pre_hook(simulated_oom)  # after the policy's hooks, in the second group
    with pytest.raises(torch.OutOfMemoryError):
        model(torch.ones(1, 4))
    failing.remove()
    assert not mover.users and not mover.held()  # no pin is left behind to keep a model on the device forever
    if attached.prefetcher is not None:
        assert all(group.users == 0 and group.fetched is None for group in attached.prefetcher.groups)
    with torch.no_grad():
        assert torch.equal(model(torch.ones(1, 4)), Stack(0)(torch.ones(1, 4)))
    attached.detach()
