"""Blocks kept on the device in a spare budget are lent to a decode that needs the room, and come back at their model's next forward."""

from __future__ import annotations

import numpy as np
import torch

from diffblocks.blocks import Pipeline
from diffblocks.components import ComponentsManager
from diffblocks.components.memory import GroupOffload, Mover
from diffblocks.components.memory.activations import activation_room, decode_bytes
from diffblocks.presets.tiny.preset import builtin_model_dir
from tests.memory.test_policies import LINEAR, Toy

INPUTS = dict(prompt="a small green cross in the center", num_inference_steps=2, progress=False)


def _call(pipe: Pipeline) -> np.ndarray:
    return np.asarray(pipe(**INPUTS, generator=torch.Generator().manual_seed(0)).images[0])


def test_a_decode_borrows_kept_blocks_runs_whole_and_the_image_stays() -> None:
    plain = _call(Pipeline.from_pretrained(builtin_model_dir()))
    moves: list[str] = []
    # 89 MiB: group offload, one 6.8 MiB text-encoder layer kept, 3.3 MiB left to activations; the 64² decode needs 5 MiB
    manager = ComponentsManager(device="cpu", memory_budget="89MiB", on_move=lambda name, device, size: moves.append(name))
    pipe = Pipeline.from_pretrained(builtin_model_dir(), manager=manager)
    first = _call(pipe)
    plan, vae = manager.plan(), pipe.components["vae"]
    assert plan.policy == GroupOffload(1) and "text_encoder" in plan.kept
    room, needs = activation_room(vae), decode_bytes(vae, (1, 4, 16, 16), itemsize=4)
    assert room is not None and room < needs  # tiled without the loan (tiles change the image: see test_activations)
    kept = "text_encoder/encoder.layer.3"
    assert moves.count(kept) == 2  # fetched when attached, lent to the decode
    second = _call(pipe)
    assert moves.count(kept) == 4  # fetched back at the text encoder's next forward, lent again
    assert np.array_equal(first, plain) and np.array_equal(second, plain)


def test_only_kept_blocks_of_models_no_call_runs_are_lent() -> None:
    mover = Mover("cpu")
    mover.keep = {"a": 2 * 2 * LINEAR, "b": 2 * 2 * LINEAR}  # two of four groups each
    a, b = Toy(), Toy()
    expected = a(torch.ones(1, 4))
    attached = [GroupOffload(1).attach("a", a, mover), GroupOffload(1).attach("b", b, mover)]
    assert mover.make_room(10**6, asking=a) == 2 * 2 * LINEAR  # b's two kept groups, not a's own
    assert mover.make_room(10**6, asking=a) == 0  # nothing left to lend but a's
    lent = []
    a.blocks[0].register_forward_pre_hook(lambda *_: lent.append(mover.make_room(10**6, asking=b)))
    assert torch.equal(a(torch.ones(1, 4)), expected)
    assert lent == [0]  # a is running: its kept groups stay
    assert mover.make_room(LINEAR, asking=b) == 2 * LINEAR  # one group frees enough
    assert torch.equal(a(torch.ones(1, 4)), expected)  # fetched back before its first layer
    for each in attached:
        each.detach()
    assert all(p.device.type == "cpu" for p in a.parameters())


def test_a_kept_block_run_outside_its_models_forward_comes_back_and_is_not_lent_under_it() -> None:
    moves: list[str] = []
    mover = Mover("cpu", on_move=lambda name, device, size: moves.append(name))
    mover.keep = {"a": 2 * 2 * LINEAR}  # blocks 1 and 3, spread through the model
    a = Toy()
    attached = GroupOffload(1).attach("a", a, mover)
    assert mover.make_room(10**6) == 2 * 2 * LINEAR  # both lent: a runs nothing now
    moves.clear()
    lent = []
    a.blocks[1][1].register_forward_pre_hook(lambda *_: lent.append(mover.make_room(10**6)))
    a.blocks[1](torch.ones(1, 4))  # as vae.decode runs its blocks: not through a's forward
    assert moves == ["a/blocks.1", "a/blocks.3"] and lent == [0]  # every lent group back first; none lent while it runs
    assert mover.make_room(10**6) == 2 * 2 * LINEAR  # once it has run, they may be lent again
    attached.detach()
