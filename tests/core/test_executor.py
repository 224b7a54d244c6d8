"""Running a pipeline: same result as a hand-written loop, validation once, callbacks, interrupt, timings."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from diffblocks.blocks import Block, BlockIO, InputError, Loop, Pipeline, Sequence, StepInfo
from tests.core.test_plan import COMPONENTS, img2img_switch, toy_blocks
from tests.core.toy import Decoder, Denoiser, reference_run


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_run_matches_hand_written_loop() -> None:
    pipe = Pipeline(toy_blocks(), COMPONENTS)
    out = pipe(num_inference_steps=5, generator=seeded(3), progress=False)
    assert torch.equal(out.images, reference_run(COMPONENTS["denoiser"], Decoder(), steps=5, seed=3))
    assert out.workflow == "default" and not out.interrupted and out.timings is None


def test_inference_mode_by_default_and_grad_on_request() -> None:
    pipe = Pipeline(toy_blocks(), COMPONENTS)
    assert pipe(progress=False).images.is_inference()
    out = pipe(progress=False, grad=True)
    assert out.images.requires_grad
    out.images.sum().backward()
    assert COMPONENTS["denoiser"].gain.grad is not None


def test_switch_picks_workflow_from_given_inputs() -> None:
    pipe = Pipeline(img2img_switch(), COMPONENTS)
    assert pipe(progress=False).workflow == "text2img"
    image = torch.rand(1, 4, 16, 16)
    out = pipe(image=image, strength=0.25, progress=False)
    assert out.workflow == "img2img"
    assert out.images.shape == (1, 4, 4, 4)
    assert pipe(image=None, progress=False).workflow == "text2img"  # None means not given


def test_inputs_validated_once_with_errors_naming_block_and_field() -> None:
    pipe = Pipeline(toy_blocks(), COMPONENTS)
    with pytest.raises(InputError) as info:
        pipe(num_inference_steps=0, height="big", promt="x", progress=False)
    problems = {p.field: p for p in info.value.problems}
    assert set(problems) == {"num_inference_steps", "height", "promt"}
    assert problems["num_inference_steps"].block == "set_timesteps"
    assert "greater than or equal to 1" in problems["num_inference_steps"].message
    assert "(expected int, got 'big')" in problems["height"].message
    assert str(info.value).startswith("3 input errors in call to 'toy'")


def test_unknown_input_suggests_the_close_name() -> None:
    pipe = Pipeline(toy_blocks(), COMPONENTS)
    with pytest.raises(InputError, match="did you mean 'height'"):
        pipe(heigth=16, progress=False)


def test_block_checks_run_before_any_block() -> None:
    calls = []

    def spy(info: StepInfo) -> None:
        calls.append(info.step_index)

    pipe = Pipeline(toy_blocks(), COMPONENTS)
    with pytest.raises(InputError, match=r"\[prepare_latents\] height: height 12 must be divisible by 8"):
        pipe(height=12, callbacks=[spy], progress=False)
    assert calls == []


def test_tensor_inputs_are_checked_for_rank() -> None:
    pipe = Pipeline(img2img_switch(), COMPONENTS)
    with pytest.raises(InputError, match=r"expected a 4-d tensor \[batch channels height width\], got shape \(4, 16\)"):
        pipe(image=torch.rand(4, 16), progress=False)


def test_callback_reads_replaces_state_and_interrupts() -> None:
    seen: list[tuple[int, int]] = []

    def callback(info: StepInfo) -> dict[str, torch.Tensor] | None:
        seen.append((info.step_index, info.num_steps))
        if info.step_index == 1:
            info.interrupt()
            return {"latents": torch.zeros_like(info.state["latents"])}
        return None

    pipe = Pipeline(toy_blocks(), COMPONENTS)
    out = pipe(num_inference_steps=5, callbacks=[callback], progress=False)
    assert seen == [(0, 5), (1, 5)]
    assert out.interrupted
    assert torch.count_nonzero(out.images) == 0  # replaced latents were decoded after the loop stopped


def test_callback_with_unknown_name_fails_clearly() -> None:
    pipe = Pipeline(toy_blocks(), COMPONENTS)
    with pytest.raises(KeyError, match="returned unknown state names \\['latent'\\]"):
        pipe(callbacks=[lambda info: {"latent": 1}], progress=False)


@pytest.mark.parametrize(
    ("replacement", "message"),
    [
        (lambda x: x.double(), r"replaced 'latents' at step 0: it was a torch\.float32 tensor of shape \(1, 4, 2, 2\).*torch\.float64"),
        (lambda x: x[:, :2], r"of shape \(1, 2, 2, 2\)"),
        (lambda x: x.tolist(), r"it was a tensor, the callback gave list"),
    ],
)
def test_callback_replacements_must_match_the_value_they_replace(replacement: Any, message: str) -> None:
    pipe = Pipeline(toy_blocks(), COMPONENTS)
    with pytest.raises(ValueError, match=message):
        pipe(callbacks=[lambda info: {"latents": replacement(info.state["latents"])}], progress=False)
    assert pipe(progress=False).images.shape == (1, 4, 4, 4)  # the next call is unaffected


def test_timings_per_block() -> None:
    pipe = Pipeline(toy_blocks(), COMPONENTS)
    out = pipe(num_inference_steps=3, timings=True, progress=False)
    assert out.timings is not None
    assert set(out.timings) == {"set_timesteps", "prepare_latents", "denoise", "denoise.predict", "denoise.update", "decode"}
    assert all(seconds >= 0 for seconds in out.timings.values())
    assert out.timings["denoise"] >= out.timings["denoise.predict"]


def test_progress_bar_over_the_loop(capsys: pytest.CaptureFixture[str]) -> None:
    pipe = Pipeline(toy_blocks(), COMPONENTS)
    pipe(num_inference_steps=3)
    assert "3/3" in capsys.readouterr().err


def test_failure_inside_a_block_says_where(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = Denoiser()
    monkeypatch.setattr(broken, "forward", lambda x, t: 1 / 0)
    pipe = Pipeline(toy_blocks(), {"denoiser": broken, "decoder": Decoder()})
    with pytest.raises(ZeroDivisionError) as info:
        pipe(progress=False)
    assert "while running block 'denoise.predict' of workflow 'default'" in "\n".join(getattr(info.value, "__notes__", []))


def test_block_returning_wrong_type_is_named() -> None:
    from tests.core.toy import Update

    class Sloppy(Update):
        def __call__(self, inputs: Update.Inputs) -> Update.Outputs:  # type: ignore[override]
            return {"latents": inputs.latents}  # type: ignore[return-value]

    pipe = Pipeline(toy_blocks(), COMPONENTS).replace_block("denoise.update", Sloppy())
    with pytest.raises(TypeError, match="block 'denoise.update' returned dict, not its declared Outputs"):
        pipe(progress=False)


def test_output_lists_what_it_has() -> None:
    out = Pipeline(toy_blocks(), COMPONENTS)(progress=False)
    assert set(out) >= {"images", "latents", "timesteps"}
    with pytest.raises(AttributeError, match="the output has no 'image'"):
        _ = out.image


def test_components_are_not_held_between_calls() -> None:
    pipe = Pipeline(toy_blocks(), {"denoiser": Denoiser(), "decoder": Decoder()})
    pipe(progress=False)
    assert pipe._build.bound == {}
    assert isinstance(Denoiser(), torch.nn.Module)


class SlowCall:
    """A call in a thread of its own that stays inside its denoiser until :meth:`end`, while others start and end."""

    def __init__(self) -> None:
        self.started, self.finish = threading.Event(), threading.Event()
        self.results: list[torch.Tensor] = []
        self.errors: list[BaseException] = []
        self.thread: threading.Thread | None = None

    def denoiser(self) -> Denoiser:
        call = self

        class Blocking(Denoiser):
            def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                if threading.current_thread() is call.thread:
                    call.started.set()
                    assert call.finish.wait(timeout=10)
                return super().forward(x, t)

        return Blocking()

    def start(self, pipe: Pipeline, **kwargs: Any) -> None:
        def run() -> None:
            try:
                self.results.append(pipe(progress=False, **kwargs).images)
            except BaseException as err:  # noqa: BLE001 - asserted in end()
                self.errors.append(err)

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.started.wait(timeout=10)

    def end(self) -> torch.Tensor:
        assert self.thread is not None
        self.finish.set()
        self.thread.join(timeout=30)
        assert not self.errors, self.errors
        return self.results[0]


def test_concurrent_calls_share_the_components_safely() -> None:
    slow = SlowCall()
    pipe = Pipeline(toy_blocks(), {"denoiser": slow.denoiser(), "decoder": Decoder()})
    slow.start(pipe, num_inference_steps=2)
    quick = pipe(num_inference_steps=1, progress=False).images  # starts and ends while the slow call runs
    assert quick.shape == slow.end().shape
    assert pipe._build.bound == {}


def test_a_call_after_update_components_uses_the_new_components_while_an_older_call_runs() -> None:
    class Doubling(Decoder):
        def forward(self, latents: torch.Tensor) -> torch.Tensor:
            return super().forward(latents) * 2

    slow = SlowCall()
    pipe = Pipeline(toy_blocks(), {"denoiser": slow.denoiser(), "decoder": Decoder()})
    expected = pipe(num_inference_steps=1, generator=torch.Generator().manual_seed(0), progress=False).images
    slow.start(pipe, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    pipe.update_components(decoder=Doubling())  # while the slow call is inside the loop
    quick = pipe(num_inference_steps=1, generator=torch.Generator().manual_seed(0), progress=False).images
    assert torch.allclose(quick, expected * 2)  # the new decoder, though an older call was in flight
    assert torch.allclose(slow.end(), expected)  # the call in flight kept the components it started with
    assert pipe._build.bound == {}


def test_a_component_replaced_under_a_running_call_keeps_its_placement_until_that_call_ends() -> None:
    from diffblocks.components import ComponentsManager
    from diffblocks.components.memory import ModelOffload

    old, slow = Decoder(), SlowCall()
    pipe = Pipeline(toy_blocks(), {"denoiser": slow.denoiser(), "decoder": old},
                    manager=ComponentsManager(device="cpu", offload=ModelOffload()))
    expected = pipe(num_inference_steps=1, generator=torch.Generator().manual_seed(0), progress=False).images
    slow.start(pipe, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    pipe.update_components(decoder=Decoder())
    assert old._forward_pre_hooks  # the slow call has yet to decode with it: still placed, still known to the manager
    assert any(row.name == "decoder" and row.key.endswith(f"{id(old):x}") for row in pipe.manager.table())
    assert torch.allclose(slow.end(), expected)
    assert not old._forward_pre_hooks  # released when the last call running it ended
    assert [row.name for row in pipe.manager.table()].count("decoder") == 1



class Tally(Block):
    """Counts the iterations of two nested loops."""

    class Inputs(BlockIO):
        total: int = 0
        i: int
        j: int

    class Outputs(BlockIO):
        total: int

    def __call__(self, inputs: Inputs) -> Outputs:
        return self.Outputs(total=inputs.total + 10 * inputs.i + inputs.j)


class Ranges(Block):
    """The lists both loops run over."""

    class Inputs(BlockIO):
        rows: int = 3
        cols: int = 2

    class Outputs(BlockIO):
        outer: list[int]
        inner: list[int]

    def __call__(self, inputs: Inputs) -> Outputs:
        return self.Outputs(outer=list(range(inputs.rows)), inner=list(range(inputs.cols)))


def nested() -> Pipeline:
    inner = Loop(Tally(), name="inner", over="inner", item="j", index="j_index", count="j_count")
    outer = Loop(inner, name="outer", over="outer", item="i", index="i_index", count="i_count")
    return Pipeline(Sequence(Ranges(), outer, name="nested"))


def test_nested_loops_run_every_iteration_with_timings_and_callbacks() -> None:
    seen: list[tuple[str, int, int]] = []
    def record(info: StepInfo) -> None:
        seen.append((info.loop, info.step_index, info.num_steps))

    out = nested()(timings=True, progress=False, callbacks=[record])
    assert out.total == sum(10 * i + j for i in range(3) for j in range(2))
    assert out.timings is not None and set(out.timings) == {"ranges", "outer", "outer.inner", "outer.inner.tally"}
    assert out.timings["outer"] >= out.timings["outer.inner"] >= out.timings["outer.inner.tally"]
    assert seen[:3] == [("outer.inner", 0, 2), ("outer.inner", 1, 2), ("outer", 0, 3)]
    assert len(seen) == 3 * 2 + 3


def test_an_interrupt_in_an_inner_loop_stops_every_loop() -> None:
    def stop(info: StepInfo) -> None:
        if info.loop == "outer.inner" and info.step_index == 0:
            info.interrupt()

    out = nested()(rows=4, cols=5, callbacks=[stop], progress=False)
    assert out.interrupted and out.total == 0  # the first inner iteration ran (i=0, j=0), nothing after it
    assert (out.i_index, out.j_index) == (0, 0)

