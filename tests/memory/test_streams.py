"""Group offload streams: the next group is fetched while one runs, each is waited for before it runs, and nothing is lost."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from diffblocks.components.memory import GroupOffload, Mover, measure
from diffblocks.components.memory.streams import Synchronous
from tests.memory.test_policies import Toy


class Recording(Synchronous):
    """A device stand-in whose copies are real copies (clones) and whose copies and waits are logged."""

    def __init__(self, log: list[tuple[str, str]]) -> None:
        super().__init__(torch.device("cpu"))
        self.log = log

    def copy(self, label: str, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        self.log.append(("copy", label))
        return [t.clone() for t in tensors], label

    def wait(self, label: str, ready: Any) -> None:
        if ready is not None:
            self.log.append(("wait", label))


def _watched(log: list[tuple[str, str]], model: Toy) -> None:
    for i, block in enumerate(model.blocks):  # registered after the policy's hooks, so they run after them
        block.register_forward_pre_hook(lambda _m, _a, i=i: log.append(("run", f"blocks.{i}")))


def test_the_next_group_is_fetched_while_one_runs_and_waited_for_before_it_runs() -> None:
    log: list[tuple[str, str]] = []
    torch.manual_seed(0)
    model = Toy()
    expected = model(torch.ones(2, 4))
    attached = GroupOffload(1).attach("m", model, Mover("cpu", streams=Recording(log)))
    _watched(log, model)
    outputs = []
    for _ in range(3):
        log.clear()
        outputs.append(model(torch.ones(2, 4)))
        if len(outputs) == 1:  # the first call learns the order: each group is fetched when it is needed
            assert log == [entry for i in range(4) for entry in [("copy", f"m/blocks.{i}"), ("wait", f"m/blocks.{i}"), ("run", f"blocks.{i}")]]
    # from then on, group k+1 (and after the last, the first) is copied before group k runs
    assert log == [entry for i in range(4) for entry in [("wait", f"m/blocks.{i}"), ("copy", f"m/blocks.{(i + 1) % 4}"), ("run", f"blocks.{i}")]]
    attached.detach()
    assert all(torch.equal(out, expected) for out in outputs)


def test_at_most_two_groups_are_on_the_device_and_the_plan_counts_them() -> None:
    on_device, most = 0, 0

    def count(_name: str, device: torch.device, size: int) -> None:
        nonlocal on_device, most
        on_device += size if device.type == "cpu" else -size
        most = max(most, on_device)

    model = Toy()
    outside = measure(model).outside_blocks
    mover = Mover("cpu", home="meta", on_move=count, streams=Recording([]))  # meta: a home the moves are counted to (groups keep theirs)
    attached = GroupOffload(1).attach("m", model, mover)
    on_device, most = outside, outside  # what the policy moved in when attached, counted from here
    for _ in range(3):
        model(torch.ones(2, 4))
    assert most == GroupOffload(1).peak([measure(model)]) == outside + 2 * measure(model).blocks[0][0]
    attached.prefetcher.release_all()  # type: ignore[union-attr]
    assert on_device == outside


def test_a_model_that_starts_running_drops_another_models_guess() -> None:
    log: list[tuple[str, str]] = []
    moves: list[tuple[str, str]] = []
    mover = Mover("cpu", streams=Recording(log), on_move=lambda name, device, size: moves.append((name, device.type)))
    first, second = Toy(), Toy()
    GroupOffload(2).attach("a", first, mover)
    GroupOffload(2).attach("b", second, mover)
    for _ in range(2):
        first(torch.ones(1, 4))
    moves.clear()
    second(torch.ones(1, 4))
    # a's first group, fetched ahead at the end of its last call, goes home before b's first group comes in
    assert moves[:2] == [("a/blocks.0..1", "cpu"), ("b/blocks.0..1", "cpu")]


def test_a_weight_changed_on_the_device_is_copied_home_and_unchanged_ones_are_not() -> None:
    model = Toy()
    homes = {name: p.data_ptr() for name, p in model.named_parameters()}
    before = model.blocks[0][0].weight.detach().clone()
    attached = GroupOffload(1).attach("m", model, Mover("cpu", streams=Recording([])))

    def bump(_module: nn.Module, _args: Any) -> None:
        with torch.no_grad():
            model.blocks[0][0].weight.add_(1.0)  # a fused adapter, say: changed in place while on the device

    handle = model.blocks[0].register_forward_pre_hook(bump)
    model(torch.ones(1, 4))
    handle.remove()
    assert torch.equal(model.blocks[0][0].weight, before + 1.0)  # home again, with the change
    attached.detach()
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == homes  # the same home tensors throughout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned memory and a side stream")
def test_on_cuda_groups_wait_pinned_and_the_output_is_unchanged() -> None:
    torch.manual_seed(0)
    model = Toy(width=256)
    expected = model.cuda()(torch.ones(8, 256, device="cuda")).cpu()
    model.cpu()
    attached = GroupOffload(1).attach("m", model, Mover("cuda"))
    assert all(p.is_pinned() for p in model.blocks.parameters())
    for _ in range(3):
        got = model(torch.ones(8, 256, device="cuda")).cpu()
        assert torch.equal(got, expected)
        # from the second call on, the last group fetches the first ahead, for the next call
        assert all(p.device.type == "cpu" for p in model.blocks[1:].parameters())
    attached.detach()
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_a_model_converted_while_attached_streams_its_new_tensors() -> None:
    # a float16 VAE whose config asks for float32 is converted for the decode and back (upcast_if_needed)
    torch.manual_seed(0)
    model = Toy()
    attached = GroupOffload(1).attach("m", model, Mover("cpu", streams=Recording([])))
    model.to(torch.float64)
    expected = Toy()
    expected.load_state_dict(model.state_dict())
    got = model(torch.ones(1, 4, dtype=torch.float64))
    assert got.dtype == torch.float64 and torch.equal(got, expected.to(torch.float64)(torch.ones(1, 4, dtype=torch.float64)))
    model.to(torch.float32)
    assert model(torch.ones(1, 4)).dtype == torch.float32
    attached.detach()
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned memory")
def test_on_cuda_model_offload_pins_each_home_once_and_going_home_copies_nothing() -> None:
    from diffblocks.components.memory import ModelOffload

    torch.manual_seed(0)
    first, second = Toy(width=256), Toy(width=256)
    x = torch.ones(8, 256, device="cuda")
    expected = [model.cuda()(x).cpu() for model in (first, second)]
    first.cpu(), second.cpu()
    mover = Mover("cuda")
    attached = [ModelOffload().attach(name, model, mover) for name, model in (("a", first), ("b", second))]
    homes = {name: p.data_ptr() for name, p in first.named_parameters()}
    assert all(p.is_pinned() for p in first.parameters())
    for _ in range(3):
        assert torch.equal(first(x).cpu(), expected[0]) and torch.equal(second(x).cpu(), expected[1])
        assert {name: p.data_ptr() for name, p in first.named_parameters()} == homes  # sent home: the same pinned tensors
    for each in attached:
        each.detach()
    assert all(p.device.type == "cpu" for p in second.parameters())
