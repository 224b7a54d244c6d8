"""Device slots: streamed groups are copied into a few reused buffers, never over weights a queued kernel still reads."""

from __future__ import annotations

import pytest
import torch

from diffblocks.components.memory import GroupOffload, Mover
from diffblocks.components.memory.slots import ALIGN, DeviceSlots, packed_bytes
from tests.memory.test_policies import Toy


class Marks:
    """A stand-in for the compute stream's events: each mark is numbered, and waiting on one is logged."""

    def __init__(self) -> None:
        self.made = 0
        self.waited: list[int] = []

    def __call__(self, _device: torch.device) -> Marks.Mark:
        self.made += 1
        return Marks.Mark(self, self.made)

    class Mark:
        def __init__(self, marks: Marks, number: int) -> None:
            self.marks, self.number = marks, number

        def synchronize(self) -> None:
            self.marks.waited.append(self.number)


def test_packed_bytes_align_each_tensor_and_refuse_what_cannot_be_a_view_of_bytes() -> None:
    tensors = [torch.zeros(3, dtype=torch.float16), torch.zeros(ALIGN, dtype=torch.uint8), torch.zeros(2, 2)]
    assert packed_bytes(tensors) == 3 * ALIGN
    assert packed_bytes([torch.zeros(4, 4).t()]) is None  # strided
    assert packed_bytes([torch.nn.Parameter(torch.zeros(2))]) is None  # a subclass: copied as it is


def test_views_are_packed_at_aligned_offsets_and_hold_what_is_copied_in() -> None:
    slots = DeviceSlots(torch.device("cpu"), mark=Marks())
    tensors = [torch.randn(5, 3), torch.arange(7, dtype=torch.int64), torch.randn(2, dtype=torch.bfloat16)]
    slot = slots.take(packed_bytes(tensors) or 0)
    assert slot is not None
    views = slot.views(tensors)
    for view, tensor in zip(views, tensors):
        view.copy_(tensor)
    assert all(torch.equal(view, tensor) and view.dtype == tensor.dtype for view, tensor in zip(views, tensors))
    offsets = [view.data_ptr() - slot.buffer.data_ptr() for view in views]
    assert offsets == [0, ALIGN, 2 * ALIGN]


def test_two_slots_are_reused_grown_when_free_and_refused_when_busy() -> None:
    marks = Marks()
    slots = DeviceSlots(torch.device("cpu"), mark=marks)
    first, second = slots.take(1024), slots.take(512)
    assert first is not None and second is not None and first is not second
    assert slots.take(256) is None  # both busy: the caller copies into tensors of its own
    slots.give_back(second)
    assert slots.take(256) is second  # the smallest free slot that fits
    slots.give_back(second)
    slots.give_back(first)
    assert slots.take(800) is first and slots.nbytes == 1024 + 512
    last_read = second.free_after.number  # type: ignore[attr-defined]
    grown = slots.take(2048)  # only the 512-byte slot is free: it grows, after its last reader is done
    assert grown is second and grown.buffer.numel() == 2048 and slots.nbytes == 1024 + 2048
    assert marks.waited == [last_read] and grown.free_after.number == marks.made  # type: ignore[attr-defined]
    slots.give_back(first)
    slots.give_back(grown)
    slots.clear()
    assert slots.slots == [] and slots.nbytes == 0


def test_a_slot_grows_only_after_its_last_copy_and_an_allocation_that_fails_drops_it() -> None:
    marks = Marks()
    slots = DeviceSlots(torch.device("cpu"), count=1, mark=marks)
    slot = slots.take(256)
    assert slot is not None
    slot.written = marks(torch.device("cpu"))  # a copy into it, fetched ahead and dropped before anyone waited for it
    written = slot.written.number  # type: ignore[attr-defined]
    slots.give_back(slot)
    assert slots.take(1024) is slot and written in marks.waited and slot.written is None

    def refuse(_nbytes: int) -> tuple[torch.Tensor, Marks.Mark]:
        raise torch.OutOfMemoryError("CUDA out of memory")

    slots.give_back(slot)
    slots._allocate = refuse  # type: ignore[method-assign]
    with pytest.raises(torch.OutOfMemoryError):
        slots.take(4096)
    assert slots.slots == []  # no slot left without a buffer: the next take makes a new one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a side stream and events")
def test_on_cuda_every_group_goes_through_two_slots_and_the_output_is_unchanged() -> None:
    torch.manual_seed(0)
    model = Toy(width=512)
    x = torch.randn(64, 512, device="cuda")
    expected = model.cuda()(x).cpu()
    model.cpu()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    mover = Mover("cuda")
    attached = GroupOffload(1).attach("m", model, mover)
    allocated = torch.cuda.memory_allocated()  # what stays on the device: the embedding and the head
    for _ in range(5):
        assert torch.equal(model(x).cpu(), expected)
    slots = mover.streams.slots  # type: ignore[attr-defined]
    group = packed_bytes([p.data for p in model.blocks[0].parameters()])
    assert len(slots.slots) == 2 and all(slot.buffer.numel() == group for slot in slots.slots)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated + 2 * group  # the slots, and no weights of their own
    attached.detach()
    mover.streams.clear()
    assert torch.cuda.memory_allocated() == before
