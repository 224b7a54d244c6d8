"""Building a pipeline checks the whole data flow once and reports every problem together."""

from __future__ import annotations

import pytest
import torch
from pydantic import Field

from diffblocks.blocks import (
    Block,
    BlockIO,
    Branch,
    Float,
    InputError,
    Loop,
    Pipeline,
    PlanError,
    Sequence,
    Switch,
    produced,
)
from diffblocks.blocks.plan import LoopStep, Step
from tests.core.toy import Decode, Decoder, Denoiser, EncodeImage, Predict, PrepareLatents, SetTimesteps, Update

COMPONENTS = {"denoiser": Denoiser(), "decoder": Decoder()}


def toy_blocks() -> Sequence:
    return Sequence(SetTimesteps(), PrepareLatents(), Loop(Predict(), Update(), name="denoise"), Decode(), name="toy")


def test_valid_pipeline_builds_and_lists_user_inputs() -> None:
    pipe = Pipeline(toy_blocks(), COMPONENTS)
    plan = pipe.plan()
    assert set(plan.user_inputs) == {"num_inference_steps", "height", "width", "batch_size", "generator"}
    assert plan.user_inputs["height"].consumers == ["prepare_latents"]
    assert "images" in plan.produced


def test_wrong_order_names_both_blocks_and_the_fix() -> None:
    blocks = Sequence(SetTimesteps(), Loop(Update(), Predict(), name="denoise"), PrepareLatents(), Decode())
    with pytest.raises(PlanError) as info:
        Pipeline(blocks, COMPONENTS)
    message = str(info.value)
    assert "[denoise.update] latents: needs 'latents', which is only produced later by 'prepare_latents'" in message
    assert "fix: move 'denoise.predict' before 'denoise.update'" in message
    assert len(info.value.problems) == 2


class WantsInt(Block):
    """Consumes latents as an int tensor."""

    class Inputs(BlockIO):
        latents: torch.Tensor | int
        noise_pred: str

    def __call__(self, inputs: Inputs) -> BlockIO:
        raise AssertionError


def test_incompatible_types_report_expected_and_given() -> None:
    blocks = Sequence(SetTimesteps(), PrepareLatents(), Predict(name="predict"), WantsInt())
    with pytest.raises(PlanError) as info:
        Pipeline(blocks, COMPONENTS)
    (problem,) = info.value.problems
    assert problem.block == "wants_int" and problem.field == "noise_pred"
    assert "expects str but 'predict' produces float Tensor[batch channels height width]" in problem.message
    assert "test_plan.py" in problem.where


def test_missing_and_mistyped_components_are_reported_together() -> None:
    with pytest.raises(PlanError) as info:
        Pipeline(toy_blocks(), {"decoder": "not a decoder"})
    problems = {p.field: p for p in info.value.problems}
    assert set(problems) == {"denoiser", "decoder"}
    assert "which the pipeline was not given" in problems["denoiser"].message
    assert "components={'denoiser': ...}" in problems["denoiser"].fix
    assert "needs a Decoder but component 'decoder' is a str" in problems["decoder"].message


def test_rank_mismatch_between_tensor_fields_is_caught() -> None:
    class Flat(Block):
        class Inputs(BlockIO):
            latents: Float["batch features"]

        def __call__(self, inputs: Inputs) -> BlockIO:
            raise AssertionError

    with pytest.raises(PlanError, match=r"expects float Tensor\[batch features\]"):
        Pipeline(Sequence(PrepareLatents(), Flat()), COMPONENTS)


def test_reserved_input_names_are_rejected() -> None:
    class Bad(Block):
        class Inputs(BlockIO):
            progress: int = 0

        def __call__(self, inputs: Inputs) -> BlockIO:
            raise AssertionError

    with pytest.raises(PlanError, match="reserved for run options"):
        Pipeline(Bad())


def test_conflicting_user_input_types_between_blocks() -> None:
    class A(Block):
        class Inputs(BlockIO):
            size: int = 1

        def __call__(self, inputs: Inputs) -> BlockIO:
            raise AssertionError

    class B(Block):
        class Inputs(BlockIO):
            size: str = Field("x")

        def __call__(self, inputs: Inputs) -> BlockIO:
            raise AssertionError

    with pytest.raises(PlanError, match="takes user input 'size' as str but 'a' takes it as int"):
        Pipeline(Sequence(A(), B()))


def img2img_switch() -> Sequence:
    start = Switch(
        Branch("img2img", EncodeImage(), when=("image",)),
        Branch("text2img", PrepareLatents()),
        name="start",
    )
    return Sequence(SetTimesteps(), start, Loop(Predict(), Update(), name="denoise"), Decode(), name="toy")


def test_switch_expands_to_one_checked_plan_per_workflow() -> None:
    pipe = Pipeline(img2img_switch(), COMPONENTS)
    assert pipe.workflows == ("img2img", "text2img")
    assert "image" in pipe.plan("img2img").user_inputs
    assert "image" not in pipe.plan("text2img").user_inputs
    paths = [path for path, _ in pipe.plan("img2img").blocks]
    assert paths[1] == "start.img2img.encode_image"
    assert isinstance(pipe.blocks.get("start.img2img"), EncodeImage)


def test_switch_trigger_must_be_an_input() -> None:
    start = Switch(Branch("odd", EncodeImage(), when=("picture",)), Branch("text2img", PrepareLatents()))
    with pytest.raises(PlanError, match="triggered by 'picture', which no block takes as a user input"):
        Pipeline(Sequence(start, Decode()), COMPONENTS)


def test_switch_rejects_default_branch_before_others() -> None:
    with pytest.raises(ValueError, match="put the default branch last"):
        Switch(Branch("text2img", PrepareLatents()), Branch("img2img", EncodeImage(), when=("image",)))


def test_switch_lists_workflows_and_hands_back_one() -> None:
    switch = img2img_switch().get("start")
    assert isinstance(switch, Switch)
    assert switch.workflows == ("img2img", "text2img")
    assert isinstance(switch.workflow("text2img"), PrepareLatents)
    with pytest.raises(KeyError, match="has no workflow 'inpaint'"):
        switch.workflow("inpaint")


def test_pipeline_owns_a_copy_of_the_blocks() -> None:
    blocks = toy_blocks()
    pipe = Pipeline(blocks, COMPONENTS)
    assert blocks.remove("decode").names == ("set_timesteps", "prepare_latents", "denoise")
    assert "decode" in pipe.blocks.names  # type: ignore[attr-defined]
    assert all(mine is not theirs for mine, theirs in zip(pipe.blocks.children(), blocks.children()))


class GuidedUpdate(Block):
    """An update whose prediction must come from an earlier block."""

    class Inputs(BlockIO):
        latents: Float["batch channels height width"]
        noise_pred: Float["batch channels height width"] = produced(description="the model's prediction")

    class Outputs(BlockIO):
        latents: Float["batch channels height width"]

    def __call__(self, inputs: Inputs) -> Outputs:
        return self.Outputs(latents=inputs.latents - inputs.noise_pred)


def guided_without_predict() -> Sequence:
    return Sequence(SetTimesteps(), PrepareLatents(), Loop(GuidedUpdate(name="update"), name="denoise"), Decode())


def test_a_produced_input_that_nothing_produces_fails_the_build() -> None:
    with pytest.raises(PlanError) as info:
        Pipeline(guided_without_predict(), COMPONENTS)
    (problem,) = info.value.problems
    assert (problem.block, problem.field) == ("denoise.update", "noise_pred")
    assert "needs 'noise_pred', which no block before it produces" in problem.message
    assert "add a block that produces 'noise_pred' before 'denoise.update'" in problem.fix
    assert "user_inputs=('noise_pred',)" in problem.fix
    assert problem.where.endswith(f"test_plan.py:{GuidedUpdate.declaration_site().rsplit(':', 1)[1]}")


def test_user_inputs_lets_the_caller_pass_a_produced_value() -> None:
    pipe = Pipeline(guided_without_predict(), COMPONENTS, user_inputs=("noise_pred",))
    assert pipe.plan().user_inputs["noise_pred"].required
    with pytest.raises(InputError, match=r"\[denoise.update\] noise_pred: is required but was not given"):
        pipe(progress=False)
    out = pipe(noise_pred=torch.zeros(1, 4, 2, 2), num_inference_steps=2, progress=False)
    assert out.images.shape == (1, 4, 4, 4)
    with pytest.raises(PlanError, match=r"\[pipeline\] t: is listed in user_inputs, but no workflow takes it from"):
        Pipeline(guided_without_predict(), COMPONENTS, user_inputs=("noise_pred", "t"))


def test_a_produced_input_made_later_is_reported_as_order() -> None:
    blocks = Sequence(SetTimesteps(), PrepareLatents(), Loop(GuidedUpdate(name="update"), Predict(), name="denoise"))
    with pytest.raises(PlanError) as info:
        Pipeline(blocks, COMPONENTS)
    (problem,) = info.value.problems
    assert "needs 'noise_pred', which is only produced later by 'denoise.predict'" in problem.message


def test_the_sd_pipeline_without_its_encoder_names_both_fixes() -> None:
    from diffblocks.presets.sd15 import sd15_blocks

    with pytest.raises(PlanError) as info:
        Pipeline(sd15_blocks().remove("encode_prompt"))
    found = {(p.block, p.field): p for p in info.value.problems}
    problem = found[("workflow.text2img.prepare_guidance", "conditioning")]
    assert problem.message.startswith("needs 'conditioning', which no block before it produces")
    assert "or build the pipeline with user_inputs=('conditioning',) to pass it at call time" in problem.fix
    assert "standard/guidance.py" in problem.where
    assert ("workflow.img2img.prepare_guidance", "negative_conditioning") in found
    with pytest.raises(PlanError) as info:
        Pipeline(sd15_blocks().remove("encode_prompt"), user_inputs=("conditioning", "negative_conditioning"))
    assert not any(p.field.endswith("conditioning") for p in info.value.problems)  # only the components are missing


def test_steps_record_the_inputs_given_by_the_call() -> None:
    def given(pipe: Pipeline, workflow: str | None = None) -> dict[str, tuple[str, ...]]:
        steps = pipe.plan(workflow).steps
        flat = [s for step in steps for s in (step.body if isinstance(step, LoopStep) else (step,))]
        return {s.path: s.given for s in flat if isinstance(s, Step)}

    assert given(Pipeline(toy_blocks(), COMPONENTS)) == {
        "set_timesteps": ("num_inference_steps",),
        "prepare_latents": ("height", "width", "batch_size", "generator"),
        "denoise.predict": (),
        "denoise.update": (),
        "decode": (),
    }
    # inside a loop of its own, the carried latents come from the call, t from the loop
    loop_only = Pipeline(Sequence(toy_blocks().get("denoise"), name="loop"), COMPONENTS)
    assert given(loop_only) == {"denoise.predict": ("latents",), "denoise.update": ("latents",)}
    img2img = given(Pipeline(img2img_switch(), COMPONENTS), "img2img")
    assert img2img["start.img2img.encode_image"] == ("image", "strength")
