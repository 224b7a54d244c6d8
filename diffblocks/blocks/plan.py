"""Compile a block tree into checked per-workflow plans, once, when a pipeline is built."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Union, final

from pydantic import AfterValidator, BaseModel, ConfigDict, create_model
from pydantic.fields import FieldInfo

from diffblocks.blocks.block import AbstractBlock, Block, BlockIO, field_type
from diffblocks.blocks.compat import describe_type, is_compatible
from diffblocks.blocks.composites import Loop, Sequence, Switch
from diffblocks.blocks.errors import Problem
from diffblocks.blocks.fields import is_produced
from diffblocks.blocks.tree import Node, join, walk
from diffblocks.blocks.types import TensorSpec

RESERVED_INPUTS = frozenset({"callbacks", "progress", "timings", "grad"})

Choices = tuple[tuple[str, str], ...]
"""The branch taken at each switch of a workflow, as ``(switch path, branch name)`` in walk order."""

_MSG_UNPRODUCED = (
    "needs {name!r}, which no block before it produces: the block declares it with produced(), "
    "a value that comes from an earlier block"
)
_FIX_UNPRODUCED = (
    "add a block that produces {name!r} before {path!r}, or build the pipeline with "
    "user_inputs=({name!r},) to pass it at call time"
)


@final
@dataclass(frozen=True, slots=True)
class Step:
    """A leaf block with the state names it reads.

    ``given`` are the inputs that come straight from the call: no earlier block of the workflow
    produces them, so their values are known before the run starts.
    """

    path: str
    block: Block
    inputs: tuple[str, ...]
    input_cls: type[BlockIO]
    output_cls: type[BlockIO]
    given: tuple[str, ...] = ()


@final
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
    choices: Choices
    steps: tuple[Step | LoopStep, ...]
    user_inputs: dict[str, UserInput]
    produced: dict[str, tuple[Any, str]]
    blocks: list[tuple[str, Block]] = field(default_factory=list)
    input_model: type[BaseModel] = BaseModel


class UserInputs(BaseModel):
    """Base of the per-workflow model that validates a call's inputs once."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="ignore", protected_namespaces=(), allow_inf_nan=False)


def expand_workflows(root: AbstractBlock) -> list[Choices]:
    """Every combination of switch branches, each in the order a call picks them."""

    def expand(chosen: dict[str, str]) -> list[Choices]:
        for node in walk(root, skip=other_branches(chosen)):
            if isinstance(node.block, Switch) and node.path not in chosen:
                return [c for name in node.block.workflows for c in expand({**chosen, node.path: name})]
        return [tuple(chosen.items())]

    return expand({})


def other_branches(choices: Mapping[str, str] | Choices) -> Callable[[Node], bool]:
    """A :func:`walk` filter that leaves out the switch branches not in ``choices``."""
    chosen = dict(choices)

    def skip(node: Node) -> bool:
        parent = node.parent
        return parent is not None and isinstance(parent.block, Switch) and chosen.get(parent.path) != node.key

    return skip


def compile_plan(choices: Choices, root: AbstractBlock, *, user_inputs: Iterable[str] = ()) -> tuple[Plan, list[Problem]]:
    """Check the data flow of one workflow of a tree and compile its steps, with every problem found.

    Args:
        choices: the branch taken at each switch (see :func:`expand_workflows`).
        root: the whole tree.
        user_inputs: inputs declared with ``produced()`` that the caller will pass instead.
    """
    name = "+".join(branch for _, branch in choices) or "default"
    checker = _FlowChecker(frozenset(user_inputs))
    steps = checker.compile(walk(root, skip=other_branches(choices)))
    checker.check_order()
    plan = Plan(name, choices, steps, checker.user_inputs, checker.available, checker.blocks)
    plan.input_model = _input_model(name, checker.user_inputs)
    return plan, checker.problems


class _FlowChecker:
    def __init__(self, allowed: frozenset[str]) -> None:
        self.available: dict[str, tuple[Any, str]] = {}
        self.user_inputs: dict[str, UserInput] = {}
        self.problems: list[Problem] = []
        self.blocks: list[tuple[str, Block]] = []
        self._allowed = allowed
        self._position = 0
        self._loop = ""
        self._paths: dict[str, str] = {}
        self._consumed_at: dict[str, tuple[int, str, str]] = {}
        self._produced_at: dict[str, list[tuple[int, str, str, bool]]] = {}
        self._wanted: dict[str, tuple[str, Block]] = {}

    def compile(self, nodes: Iterable[Node]) -> tuple[Step | LoopStep, ...]:
        """The steps of a walk, with each loop's steps nested in a :class:`LoopStep`."""
        top: list[Step | LoopStep] = []
        open_loops: list[tuple[Node, str, list[Step | LoopStep]]] = []

        def close() -> None:
            node, path, body = open_loops.pop()
            assert isinstance(node.block, Loop)
            self._loop = open_loops[-1][1] if open_loops else ""
            (open_loops[-1][2] if open_loops else top).append(LoopStep(path, node.block, tuple(body)))

        for node in nodes:
            while open_loops and not _under(node, open_loops[-1][0]):
                close()
            path = self._step_path(node)
            block = node.block
            if isinstance(block, Loop):
                self._enter_loop(block, path)
                open_loops.append((node, path, []))
            elif isinstance(block, Block):
                (open_loops[-1][2] if open_loops else top).append(self._visit_leaf(block, path))
        while open_loops:
            close()
        return tuple(top)

    def _step_path(self, node: Node) -> str:
        # A sequence lends its place to its children. A loop or a leaf that stands alone where a
        # sequence could (the root, a switch branch) is named inside that place: "start.img2img.encode_image".
        parent = node.parent
        path = "" if parent is None else join(self._paths[parent.path], node.key)
        if not isinstance(node.block, Sequence) and (parent is None or isinstance(parent.block, Switch)):
            path = join(path, node.block.name)
        self._paths[node.path] = path
        return path

    def _enter_loop(self, loop: Loop, path: str) -> None:
        self._consume(loop.over, Any, FieldInfo(annotation=Any), path, loop)
        for name, tp in ((loop.item, Any), (loop.index, int), (loop.count, int)):
            self.available[name] = (tp, path)
        self._loop = path

    def _visit_leaf(self, block: Block, path: str) -> Step:
        self._position += 1
        self.blocks.append((path, block))
        inputs = block.input_fields()
        given = tuple(name for name in inputs if name not in self.available)
        for name, info in inputs.items():
            if name in RESERVED_INPUTS:
                self.problems.append(
                    Problem(path, name, f"{name!r} is reserved for run options", "rename the input", block.declaration_site())
                )
            if name not in self.available and is_produced(info):
                self._wanted.setdefault(name, (path, block))
            self._consume(name, field_type(info), info, path, block)
        for name, info in block.output_fields().items():
            self.available[name] = (field_type(info), path)
            self._produced_at.setdefault(name, []).append((self._position, path, self._loop, name in inputs))
        return Step(path, block, tuple(inputs), block.Inputs, block.Outputs, given)

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
        for name, (path, block) in self._wanted.items():
            if name not in self._allowed and name not in self._produced_at:
                self.problems.append(
                    Problem(
                        path,
                        name,
                        _MSG_UNPRODUCED.format(name=name),
                        _FIX_UNPRODUCED.format(name=name, path=path),
                        block.declaration_site(),
                    )
                )
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


def _under(node: Node, ancestor: Node) -> bool:
    parent = node.parent
    while parent is not None:
        if parent is ancestor:
            return True
        parent = parent.parent
    return False
