"""Offload policies move exactly the tensors they should, when they should, and detach back to the model as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffblocks.components.memory.streams import Synchronous
from diffblocks.components.memory import GroupOffload, LeafOffload, ModelOffload, Mover, NoOffload, measure


class Toy(nn.Module):
    """An embedding, four repeated blocks of two layers, a head: the shape of the models we offload."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Linear(width, width)) for _ in range(4))
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


LINEAR = (4 * 4 + 4) * 4  # bytes of one Linear(4, 4)
HEAD = (4 * 2 + 2) * 4


def _run(policy: object, *models: nn.Module) -> list[tuple[str, str, int]]:
    moves: list[tuple[str, str, int]] = []
    mover = Mover("cpu", on_move=lambda name, device, size: moves.append((name, device.type, size)))
    attached = [policy.attach(f"m{i}", model, mover) for i, model in enumerate(models)]  # type: ignore[attr-defined]
    moves.append(("attached", "-", 0))
    for model in models:
        model(torch.ones(1, 4))
    for each in attached:
        each.detach()
    return moves


def test_no_offload_moves_each_model_once() -> None:
    whole = 9 * LINEAR + HEAD
    # in when attached, never during the calls, home when detached
    assert _run(NoOffload(), Toy(), Toy()) == [("m0", "cpu", whole), ("m1", "cpu", whole), ("attached", "-", 0),
                                               ("m0", "cpu", whole), ("m1", "cpu", whole)]


def test_model_offload_keeps_one_model_on_the_device() -> None:
    whole = 9 * LINEAR + HEAD
    moves = _run(ModelOffload(), Toy(), Toy())
    # m0 comes in when it runs; m1's first layer sends m0 home and brings m1; detaching sends both home
    assert moves == [("attached", "-", 0), ("m0", "cpu", whole), ("m0", "cpu", whole), ("m1", "cpu", whole),
                     ("m0", "cpu", whole), ("m1", "cpu", whole)]


def test_model_offload_moves_a_model_once_however_often_it_runs() -> None:
    model, moves = Toy(), []
    mover = Mover("cpu", on_move=lambda name, device, size: moves.append(name))
    ModelOffload().attach("m", model, mover)
    for _ in range(5):
        model(torch.ones(1, 4))
    assert moves == ["m"]


@pytest.mark.parametrize("per_group", [1, 2, 3])
def test_group_offload_streams_the_repeated_blocks(per_group: int) -> None:
    moves = _run(GroupOffload(blocks_per_group=per_group), Toy())
    groups = [list(range(4))[i : i + per_group] for i in range(0, 4, per_group)]
    names = [f"m0/blocks.{g[0]}" + (f"..{g[-1]}" if len(g) > 1 else "") for g in groups]
    streamed = [move for name, g in zip(names, groups) for move in [(name, "cpu", 2 * LINEAR * len(g))] * 2]
    assert moves == [("m0/(outside blocks)", "cpu", LINEAR + HEAD), ("attached", "-", 0), *streamed, ("m0", "cpu", 9 * LINEAR + HEAD)]


def test_leaf_offload_moves_each_layer_in_and_out_as_it_runs() -> None:
    moves = _run(LeafOffload(), Toy())
    layers = ["embed"] + [f"blocks.{b}.{i}" for b in range(4) for i in range(2)] + ["head"]
    sizes = [LINEAR] * 9 + [HEAD]
    assert moves == [("attached", "-", 0), *[m for name, size in zip(layers, sizes) for m in [(f"m0/{name}", "cpu", size)] * 2],
                     ("m0", "cpu", 9 * LINEAR + HEAD)]


@pytest.mark.parametrize("policy", [NoOffload(), ModelOffload(), GroupOffload(2), LeafOffload()])
def test_each_policy_gives_the_same_output_and_detaches_cleanly(policy: object) -> None:
    torch.manual_seed(0)
    model = Toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(torch.ones(3, 4))
    attached = policy.attach("m", model, Mover("cpu"))  # type: ignore[attr-defined]
    with torch.inference_mode():
        got = model(torch.ones(3, 4))
    attached.detach()
    assert torch.equal(got, expected)
    assert all(not sub._forward_pre_hooks and not sub._forward_hooks for sub in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.is_inference() for p in model.parameters())  # moved inside inference mode, still usable with grad


def test_policy_peaks_match_the_moves() -> None:
    size = measure(Toy())
    assert (size.total, size.outside_blocks, size.largest_leaf) == (9 * LINEAR + HEAD, LINEAR + HEAD, LINEAR)
    assert NoOffload().peak([size, size]) == 2 * size.total
    assert ModelOffload().peak([size, size]) == size.total
    assert GroupOffload(3, prefetch=False).peak([size]) == LINEAR + HEAD + 6 * LINEAR
    assert GroupOffload(1).peak([size]) == LINEAR + HEAD + 4 * LINEAR  # the running block and the one fetched ahead
    assert GroupOffload(3).peak([size]) == size.total  # two groups of three: every block
    assert LeafOffload().peak([size, size]) == LINEAR


def test_group_offload_refuses_an_empty_group() -> None:
    with pytest.raises(ValueError, match="blocks_per_group 0 must be >= 1"):
        GroupOffload(blocks_per_group=0)


@pytest.mark.parametrize("policy", [NoOffload(), ModelOffload(), GroupOffload(1), LeafOffload()])
def test_blocks_learn_where_an_offloaded_model_runs(policy: object) -> None:
    from diffblocks.blocks.standard.latents import placement
    from diffblocks.components.memory import execution_device

    model = Toy()
    assert execution_device(model) is None
    attached = policy.attach("m", model, Mover("meta"))  # type: ignore[attr-defined]  # meta: a device the weights may not be on yet
    assert execution_device(model) == torch.device("meta") and placement(model) == (torch.device("meta"), torch.float32)
    attached.mover.home = torch.device("meta")  # detaching moves home; meta tensors cannot be copied back to the CPU
    attached.detach()
    assert execution_device(model) is None


@pytest.mark.parametrize(("allowance", "kept"), [(0, []), (159, []), (160, [2]), (320, [1, 3]), (480, [0, 2, 3]), (640, [0, 1, 2, 3])])
def test_group_offload_keeps_groups_spread_evenly_within_the_allowance(allowance: int, kept: list[int]) -> None:
    moves: list[tuple[str, int]] = []
    mover = Mover("cpu", home="meta", on_move=lambda name, device, size: moves.append((name, size)))  # meta: home, counted apart
    mover.keep = {"m": allowance}
    torch.manual_seed(0)
    model = Toy()
    expected = model(torch.ones(1, 4))
    attached = GroupOffload(1).attach("m", model, mover)
    # the kept groups are fetched once, when attached
    assert moves == [("m/(outside blocks)", LINEAR + HEAD)] + [(f"m/blocks.{i}", 2 * LINEAR) for i in kept]
    del moves[:]
    assert torch.equal(model(torch.ones(1, 4)), expected)
    assert sorted({name for name, _ in moves}) == [f"m/blocks.{i}" for i in range(4) if i not in kept]
    attached.mover.home = torch.device("cpu")
    attached.detach()


class Cloning(Synchronous):
    """A device stand-in whose copies stay on the CPU (clones): the moves are counted, not made."""

    def copy(self, label: str, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], object]:
        return [t.clone() for t in tensors], None


def test_model_offload_keeps_one_model_on_the_device_under_concurrent_calls() -> None:
    import threading

    inside: set[str] = set()
    most = 0

    def count(name: str, device: torch.device, _size: int) -> None:
        nonlocal most
        (inside.add if device.type == "meta" else inside.discard)(name)
        most = max(most, len(inside))

    # moves to meta are counted, never made: the copies are CPU clones
    mover = Mover("meta", home="cpu", on_move=count, streams=Cloning(torch.device("meta")))
    models = [Toy(), Toy()]
    for i, model in enumerate(models):
        ModelOffload().attach(f"m{i}", model, mover)

    def run(model: Toy) -> None:
        for _ in range(200):
            model(torch.ones(1, 4))

    threads = [threading.Thread(target=run, args=(model,)) for model in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == 1  # the check and the swap happen together: never two models in at once
