"""Pinned homes: one page-locked buffer per group, exactly its size, unlocked with its last view, copied as one."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch

from diffblocks.components.memory import GroupOffload, ModelOffload, Mover
from diffblocks.components.memory import pinned
from diffblocks.components.memory.pinned import locked_buffer, pack
from diffblocks.components.memory.slots import ALIGN, packed_bytes, packed_views
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


def test_a_locked_buffer_is_exactly_its_size_and_unlocked_only_when_its_last_view_is_freed() -> None:
    locks = Locks()
    buffer = locked_buffer(10_000, lock=locks.lock, unlock=locks.unlock)
    address = buffer.data_ptr()
    assert buffer.numel() == 10_000 and buffer.dtype == torch.uint8
    assert locks.locked == {address: 10_000} and address % 4096 == 0  # page aligned: its own map
    view = buffer[256:512].view(torch.float32)
    del buffer
    gc.collect()
    assert locks.unlocked == []  # a view still reads it
    view.fill_(2.0)
    assert float(view.sum()) == 128.0
    del view
    gc.collect()
    assert locks.unlocked == [address]


def test_a_refused_lock_leaves_a_working_pageable_buffer_and_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pinned, "_refused", type(pinned._refused)())  # noqa: SLF001 - a fresh "warned once"
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

    allocated: list[int] = []
    again, same = pack(list(tensors), nbytes, put, allocate=lambda n: allocated.append(n) or torch.empty(n, dtype=torch.uint8))
    assert allocated == [] and same.data_ptr() == buffer.data_ptr()  # already packed: nothing copied twice
    assert [t.data_ptr() for t in again] == [t.data_ptr() for t in tensors]


class Packing(Synchronous):
    """A device stand-in that packs homes as CUDA does (without locking) and copies a packed group as one buffer."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.flat = 0
        self.apart = 0

    def home(self, tensors: list[torch.Tensor], put: Any) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        nbytes = packed_bytes(tensors)
        if nbytes is None or not tensors:
            return super().home(tensors, put)
        return pack(tensors, nbytes, put, allocate=lambda n: torch.empty(n, dtype=torch.uint8))

    def copy(self, label: str, tensors: list[torch.Tensor], packed: torch.Tensor | None = None) -> tuple[list[torch.Tensor], Any]:
        if packed is None:
            self.apart += 1
            return [t.clone() for t in tensors], None
        self.flat += 1
        return packed_views(packed.clone(), tensors), None


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
    assert streams.flat > 0 and streams.apart == 0
    storages = {p.untyped_storage().data_ptr() for p in model.blocks[0].parameters()}
    assert len(storages) == 1  # the group's home is one buffer
    attached.detach()
    assert torch.equal(model(x), expected)


def test_a_weight_replaced_while_attached_is_copied_apart_and_still_right() -> None:
    torch.manual_seed(0)
    model = Toy()
    streams = Packing()
    attached = GroupOffload(1).attach("m", model, Mover("cpu", streams=streams))
    with torch.no_grad():
        model.blocks[0][0].weight = torch.nn.Parameter(model.blocks[0][0].weight * 2)  # a new tensor, outside the buffer
    expected = Toy()
    expected.load_state_dict(model.state_dict())
    streams.flat = streams.apart = 0
    assert torch.equal(model(torch.ones(2, 4)), expected(torch.ones(2, 4)))
    assert streams.apart == 1  # that group only: its home is no longer all in the buffer
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
    assert torch.equal(model(x).cpu(), expected) and torch.equal(model(x).cpu(), expected)
    attached.detach()
    attached = GroupOffload(1).attach("m", model, Mover("cuda"))
    assert [{p.untyped_storage().data_ptr() for p in block.parameters()} for block in model.blocks] == homes
    assert torch.equal(model(x).cpu(), expected)
    attached.detach()
