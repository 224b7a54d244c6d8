"""Block checks: each block checks its own inputs before any block runs, seeing what the caller gave;
values known only at run time are refused by the block that resolves them, reported the same way."""

from __future__ import annotations

import pytest

from diffblocks.blocks import Block, BlockIO, FieldError, InputError, Loop, Pipeline, Sequence, known


class Steps(Block):
    """Resolve the step count: the caller's, or a default read from nowhere else."""

    class Inputs(BlockIO):
        steps: int | None = None

    class Outputs(BlockIO):
        steps: int
        timesteps: list[int]

    def __call__(self, inputs: Inputs) -> Outputs:
        steps = 3 if inputs.steps is None else inputs.steps
        return self.Outputs(steps=steps, timesteps=list(range(steps)))


class Seen:
    checks: list[dict[str, object]] = []
    runs: list[str] = []


class Guard(Block):
    """Needs at least ``minimum`` steps: the minimum is the caller's, the steps are resolved by ``Steps``."""

    class Inputs(BlockIO):
        steps: int
        minimum: int = 1

    class Outputs(BlockIO):
        ok: bool

    def check(self, inputs: Inputs) -> None:
        Seen.checks.append({"given": sorted(inputs.model_fields_set), "steps": known(inputs, "steps")})
        if inputs.minimum < 1:
            raise FieldError("minimum", f"minimum {inputs.minimum} must be at least 1")

    def __call__(self, inputs: Inputs) -> Outputs:
        Seen.runs.append("guard")
        if inputs.steps < inputs.minimum:
            raise FieldError("steps", f"{inputs.steps} steps is fewer than the minimum {inputs.minimum}")
        return self.Outputs(ok=True)


class Heavy(Block):
    class Inputs(BlockIO):
        t: int

    class Outputs(BlockIO):
        done: int

    def __call__(self, inputs: Inputs) -> Outputs:
        Seen.runs.append("heavy")
        return self.Outputs(done=inputs.t)


def pipeline() -> Pipeline:
    return Pipeline(Sequence(Steps(), Guard(), Loop(Heavy()), name="p"))


def test_a_check_sees_only_what_the_caller_gave() -> None:
    Seen.checks.clear()
    pipeline()(steps=5, progress=False)
    # 'steps' reaches Guard from the Steps block, so the check does not know it yet, even though the caller gave one
    assert Seen.checks == [{"given": ["minimum"], "steps": None}]
    assert pipeline().plan().steps[1].given == ("minimum",)  # type: ignore[union-attr]


def test_check_problems_come_before_any_block_runs() -> None:
    Seen.runs.clear()
    with pytest.raises(InputError, match=r"\[guard\] minimum: minimum 0 must be at least 1"):
        pipeline()(minimum=0, progress=False)
    assert Seen.runs == []


def test_a_run_time_refusal_is_an_input_error_naming_the_block() -> None:
    Seen.runs.clear()
    with pytest.raises(InputError, match=r"1 input error in call to 'p' .*\n\[guard\] steps: 3 steps is fewer than the minimum 4"):
        pipeline()(minimum=4, progress=False)
    assert Seen.runs == ["guard"]  # refused by the cheap block that knows the resolved value, before the loop
    assert pipeline()(minimum=4, steps=4, progress=False).done == 3


def test_known_reads_given_values_only() -> None:
    partial = Guard.Inputs.model_construct(minimum=2)
    assert known(partial, "minimum") == 2 and known(partial, "steps") is None
    assert known(Guard.Inputs(steps=1), "steps") == 1
