"""The relief ladder decides, in one place: the guider's batch split first, then kept blocks streamed, then a tighter policy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.components import ComponentsManager
from diffblocks.components.denoisers import Conditioning
from diffblocks.components.guiders import ClassifierFreeGuidance, GuidanceConditions, guided_prediction
from diffblocks.components.memory import GroupOffload, OffloadTightened
from diffblocks.components.memory.oom import Reliefs, offer_relief, run_relieved
from diffblocks.presets.tiny.preset import builtin_model_dir
from tests.memory.test_oom import _failing, _image


def test_reliefs_run_in_the_order_offered_each_owner_once_then_the_fallback() -> None:
    taken: list[str] = []
    reliefs = Reliefs(lambda where, message: taken.append(f"fallback {where}: {message}") is None)
    owner = object()
    reliefs.offer(owner, lambda: taken.append("split"))
    reliefs.offer(owner, lambda: taken.append("split again"))  # the same owner: offered once
    reliefs.offer("other", lambda: taken.append("other"))
    assert [reliefs.relieve("step", "oom") for _ in range(3)] == [True, True, True]
    assert taken == ["split", "other", "fallback step: oom"]
    assert not Reliefs().relieve("step", "oom")


def test_offers_reach_only_the_step_running_in_this_context() -> None:
    assert not offer_relief("guider", lambda: None)  # no step running: the caller relieves itself
    reliefs = Reliefs()
    with reliefs.active():
        assert offer_relief("guider", lambda: None)
    assert not offer_relief("guider", lambda: None)
    assert reliefs.relieve("step", "oom") and not reliefs.relieve("step", "oom")


def test_run_relieved_says_where_when_nothing_is_left() -> None:
    def never() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(torch.OutOfMemoryError, match=r"2.00 GiB \(in block 'denoise'; no cheaper placement is left"):
        run_relieved(never, Reliefs(), where="denoise")


def test_inside_a_step_the_guider_offers_the_split_and_lets_the_error_go_to_the_ladder() -> None:
    calls: list[int] = []

    def predict(x: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        calls.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("simulated")
        return x * conditioning.prompt_embeds.mean()

    conditions = GuidanceConditions({"cond": Conditioning(torch.ones(1, 1, 2)), "uncond": Conditioning(torch.zeros(1, 1, 2))})

    def step() -> torch.Tensor:
        return guided_prediction(ClassifierFreeGuidance(guidance_scale=3.0), state=None, predict=predict, latents=torch.ones(1, 4),
                                 conditions=conditions, step_index=0, num_steps=1, model=torch.nn.Identity())

    reliefs = Reliefs()
    with reliefs.active(), pytest.raises(torch.OutOfMemoryError, match="simulated"):
        step()  # the guider does not decide: the error leaves it, its offer stays with the step
    assert not conditions.sequential_after_oom
    assert torch.allclose(run_relieved(step, Reliefs(), where="denoise"), torch.full((1, 4), 3.0))
    assert calls == [2, 2, 1, 1] and conditions.sequential_after_oom


def test_a_pipeline_splits_the_batch_then_streams_kept_blocks_then_tightens() -> None:
    plain = _image(Pipeline.from_pretrained(builtin_model_dir()), guidance_batched=False)  # every step ran one pass at a time
    manager = ComponentsManager(device="cpu", memory_budget="85MiB")  # group offload with 6.3 MiB of blocks kept
    pipe = Pipeline.from_pretrained(builtin_model_dir(), manager=manager)
    calls = _failing(pipe, {1, 2, 3})  # the batched forward, the first pass alone, and again without kept blocks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = _image(pipe)
    changes = [str(w.message).split("offload policy ")[1].split(", and")[0] for w in caught if w.category is OffloadTightened]
    assert changes == ["GroupOffload(blocks_per_group=1) -> GroupOffload(blocks_per_group=1), its kept blocks streamed too",
                       "GroupOffload(blocks_per_group=1) -> GroupOffload(blocks_per_group=1, prefetch=False) "
                       "(repeated blocks stream in 1 at a time; the rest stays on the device)"]
    assert calls[:4] == [2, 1, 1, 1] and set(calls[4:]) == {1}
    assert manager.plan().policy == GroupOffload(1, prefetch=False) and manager.plan().kept == {}
    assert np.array_equal(image, plain)
