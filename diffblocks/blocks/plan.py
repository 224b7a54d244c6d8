"""Compile a block tree into checked per-workflow plans, once, when a pipeline is built."""

from __future__ import annotations

import itertools
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, create_model
from pydantic.fields import FieldInfo

from diffblocks.blocks.block import AbstractBlock, Block, BlockIO, field_type
from diffblocks.blocks.compat import describe_type, is_compatible
from diffblocks.blocks.composites import Loop, Sequence, Switch
from diffblocks.blocks.errors import Problem
from diffblocks.blocks.types import TensorSpec

RESERVED_INPUTS = frozenset({"callbacks", "progress", "timings", "grad"})


@dataclass(frozen=True, slots=True)
class Step:
    """A leaf block with the state names it reads."""

    path: str
    block: Block
    inputs: tuple[str, ...]
    input_cls: type[BlockIO]
    output_cls: type[BlockIO]
    given: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LoopStep:
    """A loop with its compiled body."""

    path: str
    loop: Loop
    body: tuple[Step | LoopStep, ...]


@dataclass
class UserInput:
    """An input no block produces: the user supplies it (or its default applies)."""

    name: str
    annotation: Any
    info: FieldInfo
    consumers: list[str]

    @property
    def required(self) -> bool:
        return self.info.is_required()


@dataclass
class Plan:
    """The checked data flow of one workflow."""

    workflow: str
    choices: tuple[tuple[str, str], ...]
    steps: tuple[Step | LoopStep, ...]
    user_inputs: dict[str, UserInput]
    produced: dict[str, tuple[Any, str]]
    blocks: list[tuple[str, Block]] = field(default_factory=list)
    input_model: type[BaseModel] = BaseModel


class UserInputs(BaseModel):
    """Base of the per-workflow model that validates a call's inputs once."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="ignore", protected_namespaces=())


def expand_workflows(root: AbstractBlock) -> list[tuple[tuple[tuple[str, str], ...], AbstractBlock]]:
    """Every combination of switch branches, as (choices, tree without switches)."""

    def expand(block: AbstractBlock, path: str) -> list[tuple[tuple[tuple[str, str], ...], AbstractBlock]]:
        if isinstance(block, Switch):
            out = []
            for branch in block.branches:
                for choices, sub in expand(branch.block, _join(path, branch.name)):
                    out.append((((path, branch.name), *choices), _renamed(sub, f"{block.name}.{branch.name}")))
            return out
        if isinstance(block, Sequence):
            per_child = [expand(child, _join(path, child.name)) for child in block]
            out = []
            for combo in itertools.product(*per_child):
                choices = tuple(c for ch, _ in combo for c in ch)
                out.append((choices, _rebuilt(block, [sub for _, sub in combo])))
            return out
        return [((), block)]

    return expand(root, "")


def compile_plan(choices: tuple[tuple[str, str], ...], tree: AbstractBlock) -> tuple[Plan, list[Problem]]:
    """Check the data flow of one switch-free tree and compile its steps, with every problem found."""
    name = "+".join(branch for _, branch in choices) or "default"
    checker = _FlowChecker()
    steps = checker.visit_children(tree, "")
    checker.check_order()
    plan = Plan(name, choices, steps, checker.user_inputs, checker.available, checker.blocks)
    plan.input_model = _input_model(name, checker.user_inputs)
    return plan, checker.problems


class _FlowChecker:
    def __init__(self) -> None:
        self.available: dict[str, tuple[Any, str]] = {}
        self.user_inputs: dict[str, UserInput] = {}
        self.problems: list[Problem] = []
        self.blocks: list[tuple[str, Block]] = []
        self._position = 0
        self._loop = ""
        self._consumed_at: dict[str, tuple[int, str, str]] = {}
        self._produced_at: dict[str, list[tuple[int, str, str, bool]]] = {}

    def visit_children(self, block: AbstractBlock, path: str) -> tuple[Step | LoopStep, ...]:
        if isinstance(block, Sequence) and not isinstance(block, Loop):
            return tuple(s for child in block for s in self.visit(child, _join(path, child.name)))
        return self.visit(block, path or block.name)

    def visit(self, block: AbstractBlock, path: str) -> tuple[Step | LoopStep, ...]:
        if isinstance(block, Loop):
            return (self._visit_loop(block, path),)
        if isinstance(block, Sequence):
            return self.visit_children(block, path)
        assert isinstance(block, Block), f"unexpected block type {type(block).__name__}"
        return (self._visit_leaf(block, path),)

    def _visit_loop(self, loop: Loop, path: str) -> LoopStep:
        self._consume(loop.over, Any, FieldInfo(annotation=Any), path, loop)
        for name, tp in ((loop.item, Any), (loop.index, int), (loop.count, int)):
            self.available[name] = (tp, path)
        outer, self._loop = self._loop, path
        body = tuple(s for child in loop for s in self.visit(child, _join(path, child.name)))
        self._loop = outer
        return LoopStep(path, loop, body)

    def _visit_leaf(self, block: Block, path: str) -> Step:
        self._position += 1
        self.blocks.append((path, block))
        given = tuple(name for name in block.input_fields() if name not in self.available)
        for name, info in block.input_fields().items():
            if name in RESERVED_INPUTS:
                self.problems.append(
                    Problem(path, name, f"{name!r} is reserved for run options", "rename the input", block.declaration_site())
                )
            self._consume(name, field_type(info), info, path, block)
        inputs = block.input_fields()
        for name, info in block.output_fields().items():
            self.available[name] = (field_type(info), path)
            self._produced_at.setdefault(name, []).append((self._position, path, self._loop, name in inputs))
        return Step(path, block, tuple(block.input_fields()), block.Inputs, block.Outputs, given)

    def _consume(self, name: str, required: Any, info: FieldInfo, path: str, block: AbstractBlock) -> None:
        if name in self.available:
            produced, producer = self.available[name]
            if not is_compatible(produced, required):
                self.problems.append(
                    Problem(
                        path,
                        name,
                        f"expects {describe_type(required)} but {producer!r} produces {describe_type(produced)}",
                        f"make {producer!r} output {describe_type(required)}, or convert it in a block between them",
                        _site(block),
                    )
                )
            return
        existing = self.user_inputs.get(name)
        if existing is None:
            self.user_inputs[name] = UserInput(name, required, info, [path])
            self._consumed_at.setdefault(name, (self._position, path, self._loop))
            return
        existing.consumers.append(path)
        if not (is_compatible(required, existing.annotation) or is_compatible(existing.annotation, required)):
            self.problems.append(
                Problem(
                    path,
                    name,
                    f"takes user input {name!r} as {describe_type(required)} but {existing.consumers[0]!r} "
                    f"takes it as {describe_type(existing.annotation)}",
                    "declare the same type in both blocks, or rename one of the inputs",
                    _site(block),
                )
            )
        elif info.is_required() and not existing.required:
            existing.info = info

    def check_order(self) -> None:
        for name, (position, consumer, loop) in self._consumed_at.items():
            if not self.user_inputs[name].required:
                continue  # an optional input is an override hook (e.g. user latents); later producers are fine
            producers = self._produced_at.get(name, ())
            later = [
                path
                for pos, path, producer_loop, updates in producers
                # x <- f(x) later in the same loop is carried state: its first value is a user input
                if pos > position and not (loop and producer_loop == loop and updates)
            ]
            if later:
                self.problems.append(
                    Problem(
                        consumer,
                        name,
                        f"needs {name!r}, which is only produced later by {later[0]!r}",
                        f"move {later[0]!r} before {consumer!r}",
                    )
                )


def _input_model(workflow: str, user_inputs: dict[str, UserInput]) -> type[BaseModel]:
    fields: dict[str, Any] = {name: (_checked(u.annotation), u.info) for name, u in user_inputs.items()}
    model_name = "".join(part.capitalize() for part in workflow.replace("+", "_").split("_")) + "Inputs"
    return create_model(model_name, __base__=UserInputs, **fields)


def _checked(annotation: Any) -> Any:
    """Add rank/dtype checks to every tensor spec in a user-input annotation (blocks' own fields skip them)."""
    if typing.get_origin(annotation) is Annotated:
        base, *meta = typing.get_args(annotation)
        checks = [AfterValidator(m.check) for m in meta if isinstance(m, TensorSpec)]
        return Annotated[(_checked(base), *meta, *checks)]  # type: ignore[misc]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType) and args:
        return Union[tuple(_checked(a) for a in args)]  # type: ignore[misc]
    return annotation


def _site(block: AbstractBlock) -> str:
    return block.declaration_site() if isinstance(block, Block) else ""


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _rebuilt(seq: Sequence, children: list[AbstractBlock]) -> Sequence:
    clone = object.__new__(type(seq))
    clone.__dict__.update(seq.__dict__)
    clone._blocks = {child.name: child for child in children}
    return clone


def _renamed(block: AbstractBlock, name: str) -> Sequence:
    # The chosen branch stands in the switch's place as "switch.branch", so step paths match Sequence.get paths.
    if isinstance(block, Sequence) and not isinstance(block, Loop):
        clone = object.__new__(type(block))
        clone.__dict__.update(block.__dict__)
        clone.name = name
        return clone
    return Sequence(block, name=name)
