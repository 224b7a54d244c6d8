"""Editing a built pipeline: swap components, replace / insert / remove blocks, subclass a block."""

from __future__ import annotations

import pytest
import torch

from diffblocks.blocks import Block, BlockIO, Float, InputError, Pipeline, PlanError, Sequence
from tests.core.test_plan import COMPONENTS, toy_blocks
from tests.core.toy import Decode, Decoder, Denoiser, Update


def test_update_components_swaps_by_value_and_rechecks() -> None:
    pipe = Pipeline(toy_blocks(), {"denoiser": Denoiser(0.1), "decoder": Decoder()})
    before = pipe(progress=False, generator=torch.Generator().manual_seed(0)).images
    pipe.update_components(denoiser=Denoiser(0.5))
    after = pipe(progress=False, generator=torch.Generator().manual_seed(0)).images
    assert not torch.equal(before, after)
    with pytest.raises(PlanError, match="needs a Denoiser but component 'denoiser' is a Decoder"):
        pipe.update_components(denoiser=Decoder())
    # the failed swap changed nothing
    again = pipe(progress=False, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(after, again)


class DampedUpdate(Update):
    """Research variant: a damped update, changing one step by subclassing."""

    class Inputs(Update.Inputs):
        damping: float = 0.5

    def __call__(self, inputs: Inputs) -> Update.Outputs:  # type: ignore[override]
        return self.Outputs(latents=inputs.latents - inputs.damping * inputs.noise_pred)


def test_subclassed_block_adds_an_input_and_stays_checked() -> None:
    pipe = Pipeline(toy_blocks(), COMPONENTS).replace_block("denoise.update", DampedUpdate())
    assert "damping" in pipe.input_names
    assert isinstance(pipe.blocks.get("denoise.update"), DampedUpdate)  # type: ignore[attr-defined]
    full = pipe(damping=1.0, progress=False, generator=torch.Generator().manual_seed(1)).images
    plain = Pipeline(toy_blocks(), COMPONENTS)(progress=False, generator=torch.Generator().manual_seed(1)).images
    assert torch.allclose(full, plain)


class Clamp(Block):
    """Clamp latents inside the loop."""

    class Inputs(BlockIO):
        latents: Float["batch channels height width"]

    class Outputs(BlockIO):
        latents: Float["batch channels height width"]

    def __call__(self, inputs: Inputs) -> Outputs:
        return self.Outputs(latents=inputs.latents.clamp(-0.1, 0.1))


def test_insert_and_remove_blocks() -> None:
    pipe = Pipeline(toy_blocks(), COMPONENTS).insert_block(Clamp(), after="denoise.update")
    assert pipe.blocks.get("denoise").names == ("predict", "update", "clamp")  # type: ignore[attr-defined]
    assert pipe(progress=False).latents.abs().max() <= 0.1
    pipe.remove_block("denoise.clamp")
    assert pipe.blocks.get("denoise").names == ("predict", "update")  # type: ignore[attr-defined]


def test_an_edit_that_breaks_the_plan_changes_nothing() -> None:
    pipe = Pipeline(toy_blocks(), COMPONENTS)
    with pytest.raises(PlanError, match="needs 'latents', which is only produced later by 'prepare_latents'"):
        pipe.insert_block(Decode(name="early_decode"), before="prepare_latents")
    assert pipe.blocks.names == ("set_timesteps", "prepare_latents", "denoise", "decode")  # type: ignore[attr-defined]
    pipe(progress=False)


def test_removing_a_producer_turns_its_output_into_a_required_input() -> None:
    pipe = Pipeline(toy_blocks(), COMPONENTS).remove_block("denoise.predict")
    assert pipe.plan().user_inputs["noise_pred"].required
    with pytest.raises(InputError, match=r"\[denoise.update\] noise_pred: is required but was not given"):
        pipe(progress=False)


def test_sequence_editing_api() -> None:
    original = Sequence(Clamp(name="a"), Clamp(name="b"))
    seq = original.insert(Clamp(name="c"), before="b")
    assert seq.names == ("a", "c", "b")
    seq = seq.replace("c", DampedUpdate())
    assert isinstance(seq["c"], DampedUpdate) and seq["c"].name == "c"
    assert seq.remove("a").names == ("c", "b")
    assert original.names == ("a", "b")  # every edit made a new tree
    with pytest.raises(ValueError, match="already has a block named 'b'"):
        seq.insert(Clamp(name="b"))
    with pytest.raises(KeyError, match="has no block 'zz'"):
        seq.get("zz")


def test_a_sub_sequence_runs_on_its_own() -> None:
    loop_only = Sequence(toy_blocks().get("denoise"), name="just_the_loop")
    pipe = Pipeline(loop_only, COMPONENTS)
    assert set(pipe.input_names) == {"timesteps", "latents"}
    latents = torch.ones(1, 4, 2, 2)
    out = pipe(timesteps=torch.tensor([500.0, 0.0]), latents=latents, progress=False)
    assert out.latents.shape == latents.shape
    assert not torch.equal(out.latents, latents)
