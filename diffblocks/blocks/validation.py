"""Call-time validation: a call's inputs against the workflow's input model, then the blocks' own checks."""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from pydantic import ValidationError

from diffblocks.blocks.compat import describe_type
from diffblocks.blocks.errors import FieldError, InputError, Problem
from diffblocks.blocks.executor import construct
from diffblocks.blocks.plan import LoopStep, Plan, Step


def validate_inputs(plan: Plan, inputs: Mapping[str, Any], *, known: frozenset[str], context: str) -> dict[str, Any]:
    """The validated values (defaults filled in), or one :class:`InputError` with every problem."""
    problems = [unknown_input(name, known) for name in inputs if name not in known]
    try:
        values = plan.input_model.model_validate(inputs).__dict__
    except ValidationError as err:
        values = {}
        problems += [input_problem(plan, e) for e in err.errors(include_url=False)]
    if problems:
        raise InputError(problems, context=context)
    return dict(values)


def check_blocks(plan: Plan, values: Mapping[str, Any], *, context: str) -> None:
    """Run every block's ``check`` on its own inputs as far as the call gives them; all failures in one :class:`InputError`."""
    problems: list[Problem] = []
    for step in leaf_steps(plan.steps):
        inputs = construct(step.input_cls, {name: values[name] for name in step.given})
        try:
            step.block.check(inputs)
        except ValueError as err:
            problems.append(Problem(step.path, field_of(err), str(err)))
    if problems:
        raise InputError(problems, context=context)


def leaf_steps(steps: tuple[Step | LoopStep, ...]) -> Iterator[Step]:
    """The leaf steps of a plan in run order, loop bodies included."""
    for step in steps:
        if isinstance(step, LoopStep):
            yield from leaf_steps(step.body)
        else:
            yield step


def unknown_input(name: str, known: frozenset[str]) -> Problem:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return Problem("pipeline", name, "is not an input of this pipeline", f"{hint}inputs: {', '.join(sorted(known))}")


def input_problem(plan: Plan, error: Any) -> Problem:
    name = str(error["loc"][0]) if error["loc"] else "inputs"
    user = plan.user_inputs.get(name)
    block = user.consumers[0] if user else "pipeline"
    if error["type"] == "missing":
        return Problem(block, name, "is required but was not given", f"pass {name}=... to the pipeline")
    expected = describe_type(user.annotation) if user else "?"
    got = error.get("input")
    shown = f"{type(got).__name__} {tuple(got.shape)}" if isinstance(got, torch.Tensor) else repr(got)[:80]
    return Problem(block, name, f"{error['msg']} (expected {expected}, got {shown})")


def field_of(err: ValueError) -> str:
    return err.field if isinstance(err, FieldError) else "inputs"
