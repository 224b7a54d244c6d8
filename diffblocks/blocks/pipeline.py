"""A checked pipeline: blocks + components, compiled once, called many times."""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from diffblocks.blocks.block import AbstractBlock, Block
from diffblocks.blocks.compat import describe_type
from diffblocks.blocks.composites import Sequence, Switch
from diffblocks.blocks.errors import FieldError, InputError, PlanError, Problem
from diffblocks.blocks.executor import Callback, RunContext, add_location_note, cuda_sync, run_steps
from diffblocks.blocks.output import PipelineOutput
from diffblocks.blocks.plan import Plan, compile_plan, expand_workflows
from diffblocks.components.manager import ComponentsManager

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

Choices = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class PresetInfo:
    """What saving needs to know about a preset pipeline: its family, index class name and settings.

    ``Pipeline.from_pretrained`` records it; set it yourself (``Pipeline(..., preset=...)``) for a
    preset built by hand whose family cannot be recognised from its blocks.

    Args:
        family: a key of :data:`diffblocks.presets.FAMILIES` (``"sd15"``, ``"sdxl"``, ...).
        class_name: the index ``_class_name``; None means the family's first class name.
        settings: the index's plain values beside the components (``requires_safety_checker``, ...).
        sources: portable references (``package://...``) of local folders the index named, by folder.
    """

    family: str
    class_name: str | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)


class Pipeline:
    """Blocks bound to components, with the data flow checked once at construction.

    Args:
        blocks: the root block (usually a :class:`Sequence`). The pipeline keeps its own copy of the tree.
        components: components by name: loaded objects or :class:`ComponentSpec` (loaded lazily).
        manager: a :class:`ComponentsManager` to share loaded components with other pipelines.
        name: a label for tables and errors.
        preset: the preset family and settings the blocks come from (recorded by ``from_pretrained``;
            used by :meth:`save_pretrained`).

    Raises:
        PlanError: every problem found (missing or mistyped inputs and components, wrong order), at once.
    """

    def __init__(
        self,
        blocks: AbstractBlock,
        components: Mapping[str, Any] | None = None,
        *,
        manager: ComponentsManager | None = None,
        name: str | None = None,
        preset: PresetInfo | None = None,
    ) -> None:
        self.name = name or blocks.name
        self.preset = preset
        self.manager = manager if manager is not None else ComponentsManager()
        self._keys: dict[str, str] = {}
        self._bound: dict[str, Any] = {}
        for component_name, value in (components or {}).items():
            self._keys[component_name] = self.manager.add(component_name, value, user=self.name)
        self._root, self._plans = self._compile(blocks, self._keys)

    @classmethod
    def from_pretrained(cls, path_or_repo: str, **kwargs: Any) -> Pipeline:
        """A ready pipeline for a repository in diffusers layout (see :func:`diffblocks.presets.from_pretrained`)."""
        from diffblocks.presets.loading import from_pretrained

        return from_pretrained(path_or_repo, **kwargs)

    def save_pretrained(self, folder: str | os.PathLike[str], **options: Any) -> Path:
        """Save components, guider and settings to a folder that :meth:`from_pretrained` (and diffusers) reads.

        See :func:`diffblocks.presets.saving.save_pretrained` for the options and rules.
        """
        from diffblocks.presets.saving import save_pretrained

        return save_pretrained(self, folder, **options)

    def push_to_hub(self, repo_id: str, **options: Any) -> CommitInfo:
        """Save to a temporary folder and upload it as one commit (see :func:`diffblocks.presets.publishing.push_to_hub`).

        Returns huggingface_hub's ``CommitInfo``.
        """
        from diffblocks.presets.publishing import push_to_hub

        return push_to_hub(self, repo_id, **options)

    # --- building -------------------------------------------------------------------------------------------

    def _compile(self, blocks: AbstractBlock, keys: Mapping[str, str]) -> tuple[AbstractBlock, dict[Choices, Plan]]:
        root = _copy_tree(blocks)
        plans: dict[Choices, Plan] = {}
        problems: list[Problem] = []
        for choices, tree in expand_workflows(root):
            plans[choices], found = compile_plan(choices, tree)
            problems += [p for p in found if p not in problems]
        problems += _check_triggers(root, plans)
        problems += self._check_components(plans, keys)
        if problems:
            raise PlanError(problems, context=f"pipeline {self.name!r}")
        for plan in plans.values():
            for _, block in plan.blocks:
                block._bound = self._bound
        return root, plans

    def _check_components(self, plans: Mapping[Choices, Plan], keys: Mapping[str, str]) -> list[Problem]:
        problems: list[Problem] = []
        for name, (needed, optional, users) in _component_needs(plans).items():
            site = users[0][1].declaration_site()
            if name not in keys:
                if not optional:
                    problems.append(
                        Problem(
                            users[0][0],
                            name,
                            f"needs component {name!r} ({describe_type(needed)}), which the pipeline was not given",
                            f"pass components={{{name!r}: ...}} (an object or a ComponentSpec), or load it from an index",
                            site,
                        )
                    )
                continue
            actual = self.manager.component_type(keys[name])
            if actual is not None and isinstance(needed, type) and not issubclass(actual, needed):
                problems.append(
                    Problem(
                        users[0][0],
                        name,
                        f"needs a {needed.__name__} but component {name!r} is a {actual.__name__}",
                        f"give a {needed.__name__} (or a subclass) as {name!r}",
                        site,
                    )
                )
        return problems

    # --- calling --------------------------------------------------------------------------------------------

    def __call__(
        self,
        *,
        callbacks: Iterable[Callback] = (),
        progress: bool = True,
        timings: bool = False,
        grad: bool = False,
        **inputs: Any,
    ) -> PipelineOutput:
        """Validate ``inputs`` once, pick the workflow, and run it.

        Args:
            callbacks: functions called after each loop iteration with a :class:`StepInfo`; they may return
                state replacements or call ``info.interrupt()``.
            progress: show a progress bar over loops.
            timings: record seconds per block in ``output.timings``.
            grad: run with autograd on (default: ``torch.inference_mode``).
            **inputs: the pipeline's inputs (see :meth:`input_schema`).
        """
        plan = self._select(frozenset(k for k, v in inputs.items() if v is not None))
        state = self._validate(plan, inputs)
        run = RunContext(tuple(callbacks), progress, {} if timings else None, sync=cuda_sync() if timings else None)
        mode = torch.enable_grad() if grad else torch.inference_mode()
        try:
            self._bind()
            self._check_blocks(plan, state)
            with mode:
                run_steps(plan.steps, state, run)
        except Exception as err:
            add_location_note(err, run, plan.workflow)
            raise
        finally:
            self._bound.clear()  # the manager, not the pipeline, keeps components alive between calls
        return PipelineOutput(state, workflow=plan.workflow, timings=run.timings, interrupted=run.interrupted)

    def _select(self, given: frozenset[str]) -> Plan:
        choices: list[tuple[str, str]] = []
        node_choices = _choose(self._root, given, "", choices)
        if node_choices is not None:
            raise InputError([node_choices])
        return self._plans[tuple(choices)]

    def _validate(self, plan: Plan, inputs: Mapping[str, Any]) -> dict[str, Any]:
        known = self.input_names
        unknown = [name for name in inputs if name not in known]
        problems = [_unknown_input(name, known) for name in unknown]
        try:
            values = plan.input_model.model_validate(inputs).__dict__
        except ValidationError as err:
            values = {}
            problems += [_input_problem(plan, e) for e in err.errors(include_url=False)]
        if problems:
            raise InputError(problems, context=f"call to {self.name!r} (workflow {plan.workflow!r})")
        return dict(values)

    def _bind(self) -> None:
        for name, key in self._keys.items():
            self._bound[name] = self.manager.get(key)

    def _check_blocks(self, plan: Plan, values: Mapping[str, Any]) -> None:
        problems: list[Problem] = []
        for path, block in plan.blocks:
            try:
                block.check(values)
            except ValueError as err:
                problems.append(Problem(path, _field_of(err), str(err)))
        if problems:
            raise InputError(problems, context=f"call to {self.name!r} (workflow {plan.workflow!r})")

    # --- changing -------------------------------------------------------------------------------------------

    def update_components(self, **components: Any) -> Pipeline:
        """Swap components by name (objects or specs); the plan is re-checked and nothing changes if it fails."""
        keys = dict(self._keys)
        added = []
        for name, value in components.items():
            keys[name] = self.manager.add(name, value, user=self.name)
            added.append(keys[name])
        try:
            root, plans = self._compile(self._root, keys)
        except PlanError:
            for key in added:
                self.manager.release(key, user=self.name)
            raise
        for name in components:
            if name in self._keys and self._keys[name] != keys[name]:
                self.manager.release(self._keys[name], user=self.name)
        self._keys, self._root, self._plans = keys, root, plans
        return self

    def replace_block(self, path: str, block: AbstractBlock) -> Pipeline:
        """Replace the block at ``path``; the plan is re-checked and nothing changes if it fails."""
        return self._edit(lambda root: root.replace(path, block))

    def insert_block(self, block: AbstractBlock, *, before: str | None = None, after: str | None = None) -> Pipeline:
        """Insert a block next to a sibling given by dotted path; re-checked like :meth:`replace_block`."""
        anchor = before or after or ""
        parent_path, _, sibling = anchor.rpartition(".")

        def edit(root: Sequence) -> None:
            parent = root.get(parent_path) if parent_path else root
            if not isinstance(parent, Sequence):
                raise KeyError(f"{parent_path!r} is not a sequence")
            parent.insert(block, before=sibling if before else None, after=sibling if after else None)

        return self._edit(edit)

    def remove_block(self, path: str) -> Pipeline:
        """Remove the block at ``path``; re-checked like :meth:`replace_block`."""
        return self._edit(lambda root: root.remove(path))

    def _edit(self, edit: Any) -> Pipeline:
        root = _copy_tree(self._root)
        if not isinstance(root, Sequence):
            raise TypeError("blocks can only be edited inside a Sequence root")
        edit(root)
        self._root, self._plans = self._compile(root, self._keys)
        return self

    # --- looking --------------------------------------------------------------------------------------------

    @property
    def blocks(self) -> AbstractBlock:
        """The pipeline's block tree (edit it through replace_block / insert_block / remove_block)."""
        return self._root

    @property
    def workflows(self) -> tuple[str, ...]:
        return tuple(plan.workflow for plan in getattr(self, "_plans", {}).values())

    def plan(self, workflow: str | None = None) -> Plan:
        """The compiled plan of one workflow (the only one when there is no switch)."""
        for plan in self._plans.values():
            if workflow is None or plan.workflow == workflow:
                return plan
        raise KeyError(f"no workflow {workflow!r}; workflows: {list(self.workflows)}")

    @property
    def input_names(self) -> frozenset[str]:
        return frozenset(name for plan in self._plans.values() for name in plan.user_inputs)

    @property
    def components(self) -> dict[str, Any]:
        """Components by name (loading any that are still lazy)."""
        return {name: self.manager.get(key) for name, key in self._keys.items()}

    def component_keys(self) -> dict[str, str]:
        return dict(self._keys)

    def __repr__(self) -> str:
        from diffblocks.blocks.introspect import render_tree

        root = getattr(self, "_root", None)
        tree = render_tree(root) if root is not None else "(not built)"
        return f"Pipeline {self.name!r} (workflows: {', '.join(self.workflows)})\n" + tree

    def input_schema(self, workflow: str | None = None) -> dict[str, Any]:
        """JSON Schema of the inputs of a workflow."""
        from diffblocks.blocks.introspect import json_schema

        return json_schema(self.plan(workflow).input_model)

    def output_schema(self, workflow: str | None = None) -> dict[str, Any]:
        """JSON Schema of every value a workflow produces."""
        from diffblocks.blocks.introspect import outputs_schema

        return outputs_schema(self.plan(workflow))

    def doc(self) -> str:
        """Markdown reference of the pipeline's workflows, inputs, outputs and components."""
        from diffblocks.blocks.introspect import pipeline_doc

        return pipeline_doc(self)

    def mermaid(self, workflow: str | None = None) -> str:
        """A Mermaid flowchart of a workflow's blocks and the values between them."""
        from diffblocks.blocks.introspect import mermaid

        return mermaid(self.plan(workflow))


def _copy_tree(block: AbstractBlock) -> AbstractBlock:
    if isinstance(block, Switch):
        clone = copy.copy(block)
        clone.branches = tuple(type(b)(b.name, _copy_tree(b.block), b.when) for b in block.branches)
        return clone
    if isinstance(block, Sequence):
        clone = copy.copy(block)
        clone._blocks = {name: _copy_tree(child) for name, child in block._blocks.items()}
        return clone
    clone = copy.copy(block)
    if isinstance(clone, Block):
        clone._bound = {}
    return clone


def _choose(block: AbstractBlock, given: frozenset[str], path: str, choices: list[tuple[str, str]]) -> Problem | None:
    if isinstance(block, Switch):
        branch = block.select(given)
        if branch is None:
            options = "; ".join(f"{b.name} (give {', '.join(b.when)})" for b in block.branches)
            return Problem(path or block.name, "inputs", f"no workflow matches the given inputs. Workflows: {options}")
        choices.append((path, branch.name))
        return _choose(branch.block, given, _join(path, branch.name), choices)
    if isinstance(block, Sequence):
        for child in block:
            problem = _choose(child, given, _join(path, child.name), choices)
            if problem is not None:
                return problem
    return None


def _component_needs(plans: Mapping[Choices, Plan]) -> dict[str, tuple[Any, bool, list[tuple[str, Block]]]]:
    needs: dict[str, tuple[Any, bool, list[tuple[str, Block]]]] = {}
    for plan in plans.values():
        for path, block in plan.blocks:
            for name, decl in block.components().items():
                needed = decl.annotation()
                if name in needs:
                    known, optional, users = needs[name]
                    if (path, block) not in users:
                        users.append((path, block))
                    if isinstance(needed, type) and isinstance(known, type) and issubclass(needed, known):
                        known = needed  # the most specific declaration is what every user can rely on
                    needs[name] = (known, optional and decl.optional, users)
                else:
                    needs[name] = (needed, decl.optional, [(path, block)])
    return needs


def _check_triggers(root: AbstractBlock, plans: Mapping[Choices, Plan]) -> list[Problem]:
    inputs = {name for plan in plans.values() for name in plan.user_inputs}
    problems = []
    for path, switch in _switches(root, ""):
        for branch in switch.branches:
            for name in branch.when:
                if name not in inputs:
                    problems.append(
                        Problem(
                            path,
                            name,
                            f"branch {branch.name!r} is triggered by {name!r}, which no block takes as a user input",
                            "trigger on an input that a block of the branch declares",
                        )
                    )
    return problems


def _switches(block: AbstractBlock, path: str) -> Iterable[tuple[str, Switch]]:
    if isinstance(block, Switch):
        yield path or block.name, block
        for branch in block.branches:
            yield from _switches(branch.block, _join(path or block.name, branch.name))
    elif isinstance(block, Sequence):
        for child in block:
            yield from _switches(child, _join(path, child.name))


def _unknown_input(name: str, known: frozenset[str]) -> Problem:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return Problem("pipeline", name, "is not an input of this pipeline", f"{hint}inputs: {', '.join(sorted(known))}")


def _input_problem(plan: Plan, error: Any) -> Problem:
    name = str(error["loc"][0]) if error["loc"] else "inputs"
    user = plan.user_inputs.get(name)
    block = user.consumers[0] if user else "pipeline"
    if error["type"] == "missing":
        return Problem(block, name, "is required but was not given", f"pass {name}=... to the pipeline")
    expected = describe_type(user.annotation) if user else "?"
    got = error.get("input")
    shown = f"{type(got).__name__} {tuple(got.shape)}" if isinstance(got, torch.Tensor) else repr(got)[:80]
    return Problem(block, name, f"{error['msg']} (expected {expected}, got {shown})")


def _field_of(err: ValueError) -> str:
    return err.field if isinstance(err, FieldError) else "inputs"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
