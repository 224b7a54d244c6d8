"""Pinned homes: one page-locked buffer per group, exactly its size, unlocked with its last view, copied as one."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch

from diffblocks.components.memory import GroupOffload, ModelOffload, Mover
from diffblocks.components.memory import pinned
from diffblocks.components.memory.pinned import group_home, locked_buffer, pack, read_until
from diffblocks.components.memory.slots import ALIGN, Runs, packed_bytes, packed_runs, packed_views
from diffblocks.components.memory.streams import Synchronous
from tests.memory.test_policies import Toy


class Locks:
    """A driver stand-in: records what is locked and unlocked, and may refuse."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.locked: dict[int, int] = {}
        self.unlocked: list[int] = []
        self.refuse = refuse

    def lock(self, ptr: int, size: int) -> bool:
        if self.refuse:
            return False
        self.locked[ptr] = size
        return True

    def unlock(self, ptr: int) -> None:
        self.unlocked.append(ptr)


def test_a_locked_buffer_is_exactly_its_size_on_its_own_pages_and_unlocked_only_when_its_last_view_is_freed() -> None:
    locks = Locks()
    buffer = locked_buffer(10_000, lock=locks.lock, unlock=locks.unlock)
    address = buffer.data_ptr()
    assert buffer.numel() == 10_000 and buffer.dtype == torch.uint8
    assert locks.locked == {address: 12_288} and address % 4096 == 0  # its own map: whole pages, locked whole
    view = buffer[256:512].view(torch.float32)
    del buffer
    gc.collect()
    assert locks.unlocked == []  # a view still reads it
    view.fill_(2.0)
    assert float(view.sum()) == 128.0
    del view
    gc.collect()
    assert locks.unlocked == [address]


def test_the_memory_is_unlocked_only_after_the_last_copy_that_reads_it_is_complete() -> None:
    order: list[str] = []
    buffer = locked_buffer(4096, lock=lambda _p, _s: True, unlock=lambda _p: order.append("unlocked"))

    class Event:  # a copy queued on a stream: complete once synchronized
        def synchronize(self) -> None:
            order.append("copy complete")

    read_until(buffer[256:512], Event())  # bytes of the buffer, as a group's run is
    del buffer
    gc.collect()
    assert order == ["copy complete", "unlocked"]


def test_a_refused_lock_leaves_a_working_pageable_buffer_and_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pinned, "_refused", False)  # a fresh "warned once"
    locks = Locks(refuse=True)
    with pytest.warns(RuntimeWarning, match="refused to page-lock"):
        first = locked_buffer(64, lock=locks.lock, unlock=locks.unlock)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = locked_buffer(64, lock=locks.lock, unlock=locks.unlock)
    first.fill_(1), second.fill_(2)
    assert int(first.sum()) == 64 and int(second.sum()) == 128
    del first, second
    gc.collect()
    assert locks.unlocked == []  # nothing was locked, nothing is unlocked


def test_huge_pages_are_asked_for_buffers_of_two_mib_or_more_and_a_refusal_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    advised: list[tuple[int, int]] = []

    def madvise(self: Any, option: int, *_: Any) -> None:
        advised.append((len(self), option))
        raise OSError(22, "Invalid argument")  # a kernel without transparent huge pages

    monkeypatch.setattr(pinned, "HUGE_PAGES", 14)  # Linux's MADV_HUGEPAGE, also where the platform has none
    monkeypatch.setattr(pinned._LockedMap, "madvise", madvise)
    small = locked_buffer(2**21 - 1, lock=lambda _p, _s: True, unlock=lambda _p: None)
    large = locked_buffer(2**21, lock=lambda _p, _s: True, unlock=lambda _p: None)
    assert advised == [(2**21, 14)]  # a smaller buffer cannot hold one huge page
    large.fill_(3)
    assert int(large[-1]) == 3 and large.numel() == 2**21 and small.numel() == 2**21 - 1
    monkeypatch.setattr(pinned, "HUGE_PAGES", None)  # none asked for
    locked_buffer(2**22, lock=lambda _p, _s: True, unlock=lambda _p: None)
    assert len(advised) == 1


def test_pack_lays_tensors_out_as_a_slot_does_and_lets_each_original_go_before_the_next() -> None:
    originals = [torch.randn(5, 3), torch.arange(7, dtype=torch.int64), torch.randn(2, dtype=torch.bfloat16)]
    expected = [t.clone() for t in originals]
    watched = [weakref.ref(t) for t in originals]
    freed_before: list[bool] = []

    def put(i: int, home: torch.Tensor) -> None:
        gc.collect()
        freed_before.append(all(ref() is None for ref in watched[:i]))  # every earlier original is gone already

    nbytes = packed_bytes(originals)
    assert nbytes == 3 * ALIGN
    tensors, buffer = pack(originals, nbytes, put, allocate=lambda n: torch.empty(n, dtype=torch.uint8))
    assert freed_before == [True, True, True]
    assert all(torch.equal(home, want) and home.dtype == want.dtype for home, want in zip(tensors, expected))
    assert [t.data_ptr() - buffer.data_ptr() for t in tensors] == [0, ALIGN, 2 * ALIGN]
    # the layout is a slot's: one flat copy of the buffer is every tensor copied
    slot = torch.empty(nbytes, dtype=torch.uint8)
    slot.copy_(buffer)
    assert all(torch.equal(a, b) for a, b in zip(packed_views(slot, tensors), expected))



def _plain(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def _slot_from(runs: Runs, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """What a device slot holds after the runs are copied into it, viewed as ``tensors``."""
    slot = torch.full((packed_bytes(tensors) or 0,), 255, dtype=torch.uint8)
    for start, source in runs:
        slot[start : start + source.numel()].copy_(source)
    return packed_views(slot, tensors)


def test_runs_are_stretches_laid_out_as_a_slot_wherever_they_lie() -> None:
    whole = [torch.randn(3), torch.randn(70), torch.zeros(0), torch.randn(2, 2), torch.randn(5)]
    homes, buffer = pack(list(whole), packed_bytes(whole) or 0, lambda _i, _h: None, allocate=_plain)
    assert len(packed_runs(homes) or []) == 1  # packed whole: one run (the empty tensor takes no room)
    middle = homes[1:4]  # a group of blocks inside a model packed whole
    (run,) = packed_runs(middle) or []
    assert run[0] == 0 and run[1].data_ptr() == middle[0].data_ptr()
    assert all(torch.equal(a, b) for a, b in zip(_slot_from([run], middle), whole[1:4]))
    # out of order, with a gap, or from another storage: a run each, still filling the slot right
    for group in ([homes[3], homes[1]], [homes[0], homes[3]], [homes[1], torch.randn(2, 2)]):
        runs = packed_runs(group) or []
        assert len(runs) == 2 and all(torch.equal(a, b) for a, b in zip(_slot_from(runs, group), group))
    assert packed_runs([torch.zeros(4, 4).t()]) is None  # not a view of bytes: copied tensor by tensor


class Packing(Synchronous):
    """A device stand-in that keeps homes as CUDA does (its own buffers count as pinned) and copies a group by its runs."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.flat = self.apart = self.packed = 0  # groups copied by runs, tensor by tensor; buffers made
        self.runs = 0
        self.made: set[int] = set()

    def _allocate(self, nbytes: int) -> torch.Tensor:
        self.packed += 1
        buffer = _plain(nbytes)
        self.made.add(buffer.untyped_storage().data_ptr())
        return buffer

    def home(self, tensors: list[torch.Tensor], put: Any) -> tuple[list[torch.Tensor], Runs | None]:
        if packed_bytes(tensors) is None:
            return super().home(tensors, put)
        return group_home(tensors, put, pinned=lambda t: t.untyped_storage().data_ptr() in self.made, allocate=self._allocate)

    def copy(self, label: str, tensors: list[torch.Tensor], runs: Runs | None = None) -> tuple[list[torch.Tensor], Any]:
        if runs is None:
            self.apart += 1
            return [t.clone() for t in tensors], None
        self.flat, self.runs = self.flat + 1, self.runs + len(runs)
        return _slot_from(runs, tensors), None


@pytest.mark.parametrize("policy", [GroupOffload(1), ModelOffload()], ids=repr)
def test_packed_groups_go_as_one_copy_and_the_output_is_unchanged(policy: Any) -> None:
    torch.manual_seed(0)
    model = Toy()
    x = torch.ones(2, 4)
    expected = model(x)
    streams = Packing()
    attached = policy.attach("m", model, Mover("cpu", streams=streams))
    for _ in range(3):
        assert torch.equal(model(x), expected)
    assert streams.flat > 0 and streams.apart == 0 and streams.runs == streams.flat  # a group packed whole: one copy
    storages = {p.untyped_storage().data_ptr() for p in model.blocks[0].parameters()}
    assert len(storages) == 1  # the group's home is one buffer
    attached.detach()
    assert torch.equal(model(x), expected)


def test_a_weight_replaced_while_attached_is_packed_alone_and_still_right() -> None:
    torch.manual_seed(0)
    model = Toy()
    streams = Packing()
    attached = GroupOffload(1).attach("m", model, Mover("cpu", streams=streams))
    with torch.no_grad():
        model.blocks[0][0].weight = torch.nn.Parameter(model.blocks[0][0].weight * 2)  # a new tensor, outside the buffer
    expected = Toy()
    expected.load_state_dict(model.state_dict())
    streams.flat = streams.apart = streams.packed = 0
    for _ in range(2):
        assert torch.equal(model(torch.ones(2, 4)), expected(torch.ones(2, 4)))
    assert streams.packed == 1 and streams.apart == 0  # that weight only, once; its group copied by runs
    model.to(torch.float64)  # every weight replaced, as a VAE upcast for its decode
    streams.packed = streams.runs = streams.flat = 0
    assert torch.equal(model(torch.ones(2, 4, dtype=torch.float64)), expected.to(torch.float64)(torch.ones(2, 4, dtype=torch.float64)))
    assert streams.packed == 4 and streams.apart == 0 and streams.runs == streams.flat  # each group packed afresh, one copy
    attached.detach()


def test_regrouping_a_model_packed_whole_copies_nothing() -> None:
    torch.manual_seed(0)
    model = Toy()
    x = torch.ones(2, 4)
    expected = model(x)
    streams = Packing()
    attached = ModelOffload().attach("m", model, Mover("cpu", streams=streams))
    assert torch.equal(model(x), expected) and streams.packed == 1
    attached.detach()  # the model home again, in its one buffer
    whole = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(whole) == 1
    attached = GroupOffload(1).attach("m", model, Mover("cpu", streams=streams))  # tightened: one block at a time
    assert streams.packed == 1  # each block is a run of the model's buffer: streamed from there
    assert {p.untyped_storage().data_ptr() for p in model.blocks.parameters()} == whole
    streams.flat = streams.runs = 0
    assert torch.equal(model(x), expected) and streams.flat == streams.runs == 4  # one copy a block
    attached.detach()
    attached = GroupOffload(2).attach("m", model, Mover("cpu", streams=streams))  # coarser again: still nothing copied
    streams.flat = streams.runs = 0
    assert torch.equal(model(x), expected) and streams.packed == 1 and streams.flat == 2
    attached.detach()


def test_a_weight_tied_into_two_groups_is_packed_once_and_stays() -> None:
    torch.manual_seed(0)
    model = Toy()
    model.blocks[2][0].weight = model.blocks[0][0].weight  # tied across groups
    x = torch.ones(2, 4)
    expected = model(x)
    streams = Packing()
    attached = GroupOffload(1).attach("m", model, Mover("cpu", streams=streams))
    for _ in range(3):
        assert torch.equal(model(x), expected)
    assert streams.packed == 4  # a buffer per group, made when attached; none made again while running
    assert model.blocks[2][0].weight is model.blocks[0][0].weight
    attached.detach()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: page-locked memory")
def test_on_cuda_each_group_home_is_one_registered_buffer_kept_when_attached_again() -> None:
    torch.manual_seed(0)
    model = Toy(width=256)
    x = torch.ones(8, 256, device="cuda")
    expected = model.cuda()(x).cpu()
    model.cpu()
    attached = GroupOffload(1).attach("m", model, Mover("cuda"))
    homes = [{p.untyped_storage().data_ptr() for p in block.parameters()} for block in model.blocks]
    assert all(len(each) == 1 for each in homes) and all(p.is_pinned() for p in model.blocks.parameters())
    assert attached.prefetcher is not None and all(group.runs is not None and len(group.runs) == 1 for group in attached.prefetcher.groups)
    assert torch.equal(model(x).cpu(), expected) and torch.equal(model(x).cpu(), expected)
    attached.detach()
    attached = GroupOffload(1).attach("m", model, Mover("cuda"))
    assert [{p.untyped_storage().data_ptr() for p in block.parameters()} for block in model.blocks] == homes
    assert torch.equal(model(x).cpu(), expected)
    attached.detach()


def test_a_model_with_packed_homes_saves_in_the_same_shards(tmp_path: Any) -> None:
    from safetensors.torch import load_file

    from diffblocks.components.models.saving import save_weights

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(6)))  # about 16.6 KB a layer
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    plain = save_weights(model.state_dict(), tmp_path / "plain", max_shard_size=40_000)
    ModelOffload().attach("m", model, Mover("cpu", streams=Packing()))
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1  # one buffer: not one tied tensor
    packed = save_weights(model.state_dict(), tmp_path / "packed", max_shard_size=40_000)
    assert [p.name for p in packed] == [p.name for p in plain] and len(packed) > 2
    loaded = {k: v for path in packed if path.suffix == ".safetensors" for k, v in load_file(path).items()}
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: page-locked memory")
def test_on_cuda_a_refused_lock_leaves_no_error_for_the_next_kernel() -> None:
    buffer = locked_buffer(1 << 20)
    assert buffer.is_pinned()
    assert not pinned._cuda_lock(buffer.data_ptr(), 1 << 20)  # noqa: SLF001 - locked already: the driver refuses
    assert float(torch.ones(4, device="cuda").mul_(2).sum()) == 8.0  # raised the refusal here, with the runtime's API
    del buffer
    gc.collect()
    again = locked_buffer(1 << 20)  # unlocked when freed: the driver locks new memory again, wherever it lands
    assert again.is_pinned()
