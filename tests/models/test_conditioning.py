"""Conditioning: checked once when made, concatenated along the batch, moved; reserved fields ride along."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from diffblocks.components.denoisers import Conditioning
from diffblocks.components.guiders import GuidanceConditions
from diffblocks.components.models.flux import prepare_image_ids, prepare_text_ids

BATCH, SEQ, DIM = 2, 5, 8


def full(batch: int = BATCH, fill: float = 1.0) -> Conditioning:
    """Every field set: the prompt fields, the reserved ones, and the shared Flux ones."""
    return Conditioning(
        torch.full((batch, SEQ, DIM), fill),
        pooled_embeds=torch.full((batch, 4), fill),
        time_ids=torch.full((batch, 6), fill),
        prompt_mask=torch.ones(batch, SEQ, dtype=torch.bool),
        image_embeds=(torch.full((batch, 3, DIM), fill),),
        control_residuals=(torch.full((batch, 4, 8, 8), fill), torch.full((batch, 8, 4, 4), fill)),
        text_ids=prepare_text_ids(SEQ),
        image_ids=prepare_image_ids(2, 3),
        embedded_guidance=torch.tensor([3.5]),
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt_embeds": torch.zeros(BATCH, DIM)}, r"prompt_embeds must be \(batch, seq, dim\), got shape \(2, 8\)"),
        ({"pooled_embeds": torch.zeros(BATCH, 1, 4)}, r"pooled_embeds must be \(batch, dim\)"),
        ({"pooled_embeds": torch.zeros(3, 4)}, "pooled_embeds has batch 3 but prompt_embeds has batch 2"),
        ({"time_ids": torch.zeros(1, 6)}, "time_ids has batch 1 but prompt_embeds has batch 2"),
        ({"prompt_mask": torch.ones(BATCH, SEQ + 1)}, "prompt_mask covers 6 tokens but prompt_embeds has 5"),
        ({"image_embeds": (torch.zeros(1, 3, DIM),)}, "image_embeds has batch 1"),
        ({"control_residuals": (torch.zeros(BATCH, 4, 8, 8), torch.zeros(3, 4))}, "control_residuals has batch 3"),
        ({"control_residuals": (torch.zeros(BATCH),)}, "control_residuals must be tensors of"),
        ({"text_ids": prepare_text_ids(SEQ + 2)}, "text_ids has 7 positions but prompt_embeds has 5 tokens"),
        ({"image_ids": torch.zeros(6, 2)}, r"image_ids must be \(seq, 3\)"),
        ({"embedded_guidance": torch.tensor([3.5, 3.5])}, r"embedded_guidance must be \(1,\)"),
    ],
)
def test_construction_errors_name_the_field(changes: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"prompt_embeds": torch.zeros(BATCH, SEQ, DIM), **changes}
    with pytest.raises(ValueError, match=message):
        Conditioning(**fields)


def test_cat_joins_the_batched_fields_and_keeps_one_copy_of_the_shared_ones() -> None:
    cond, uncond = full(fill=1.0), full(batch=1, fill=0.0)
    both = Conditioning.cat([cond, uncond])
    assert both.batch_size == 3
    assert both.prompt_embeds[:, 0, 0].tolist() == [1.0, 1.0, 0.0]
    assert both.pooled_embeds is not None and both.pooled_embeds.shape == (3, 4)
    assert both.time_ids is not None and both.time_ids.shape == (3, 6)
    assert both.prompt_mask is not None and both.prompt_mask.shape == (3, SEQ)
    # the shared fields are equal, not the same objects: one of them is kept, not concatenated
    assert both.text_ids is not None and both.text_ids.shape == (SEQ, 3)
    assert both.image_ids is not None and both.image_ids.shape == (6, 3)
    assert both.embedded_guidance is not None and both.embedded_guidance.tolist() == [3.5]
    assert Conditioning.cat([cond]) is cond


def test_the_reserved_fields_are_carried_through_batching() -> None:
    cond, uncond = full(fill=1.0), full(fill=0.0)
    both = GuidanceConditions({"cond": cond, "uncond": uncond}).batched(("cond", "uncond"))
    assert both.image_embeds is not None and both.control_residuals is not None
    assert [tuple(part.shape) for part in both.image_embeds] == [(4, 3, DIM)]
    assert [tuple(part.shape) for part in both.control_residuals] == [(4, 4, 8, 8), (4, 8, 4, 4)]
    assert both.control_residuals[1][:, 0, 0, 0].tolist() == [1.0, 1.0, 0.0, 0.0]  # cond first, then uncond


def pooled(seq: int = SEQ, **shared: Tensor) -> Conditioning:
    return Conditioning(torch.zeros(1, seq, DIM), pooled_embeds=torch.zeros(1, 4), **shared)


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        (pooled(), Conditioning(torch.zeros(1, SEQ, DIM)), "pooled_embeds is set on 1 of 2 conditionings"),
        (pooled(), pooled(SEQ + 1), r"prompt_embeds has shape \(5, 8\) .* \(6, 8\) in conditioning 1"),
        (
            pooled(text_ids=prepare_text_ids(SEQ)),
            pooled(text_ids=prepare_text_ids(SEQ) + 1),
            "text_ids differs between the conditionings",
        ),
    ],
    ids=["presence", "shape", "shared"],
)
def test_conditionings_that_cannot_be_joined_are_refused_by_name(first: Conditioning, second: Conditioning, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Conditioning.cat([first, second])
    with pytest.raises(ValueError, match=message):  # at construction, before any step runs
        GuidanceConditions({"cond": first, "uncond": second})


def test_to_moves_every_field_and_casts_only_floating_point_ones() -> None:
    moved = full().to(device="meta", dtype=torch.float16)
    tensors: list[Tensor] = [
        moved.prompt_embeds,
        *(t for t in (moved.pooled_embeds, moved.time_ids, moved.text_ids, moved.image_ids, moved.embedded_guidance) if t is not None),
        *(moved.image_embeds or ()),
        *(moved.control_residuals or ()),
    ]
    assert len(tensors) == 9
    assert all(t.device.type == "meta" and t.dtype == torch.float16 for t in tensors)
    assert moved.prompt_mask is not None and moved.prompt_mask.dtype == torch.bool and moved.prompt_mask.device.type == "meta"
    assert full().to(dtype=torch.bfloat16).prompt_embeds.device.type == "cpu"


def test_conditioning_is_frozen() -> None:
    conditioning = full()
    with pytest.raises(AttributeError):
        setattr(conditioning, "prompt_embeds", torch.zeros(1, SEQ, DIM))  # noqa: B010 - assigning a frozen field is the test
