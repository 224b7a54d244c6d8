"""Build-time checks beyond the data flow (components, switch triggers, declared user inputs), and workflow choice."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from diffblocks.blocks.block import AbstractBlock, Block
from diffblocks.blocks.compat import describe_type
from diffblocks.blocks.composites import Switch
from diffblocks.blocks.errors import FieldError, Problem
from diffblocks.blocks.plan import Choices, Plan
from diffblocks.blocks.tree import Node, walk
from diffblocks.components.manager import ComponentsManager


@dataclass(frozen=True, slots=True)
class SwitchPoint:
    """A switch of a tree, found once when a pipeline is built, so that a call picks its workflow without a walk.

    ``within`` are the branches of enclosing switches it sits in: it is asked only when they are taken.
    """

    path: str
    label: str
    switch: Switch
    within: Choices


def switch_points(root: AbstractBlock) -> tuple[SwitchPoint, ...]:
    """Every switch of a tree in walk order (the order :func:`~diffblocks.blocks.plan.expand_workflows` chooses in)."""
    return tuple(
        SwitchPoint(node.path, node.label, node.block, _within(node))
        for node in walk(root)
        if isinstance(node.block, Switch)
    )


def choose_workflow(points: Iterable[SwitchPoint], given: frozenset[str]) -> Choices | Problem:
    """The branches a call with these given inputs takes, or the problem when a switch has no branch for them."""
    chosen: dict[str, str] = {}
    for point in points:
        if any(chosen.get(path) != branch for path, branch in point.within):
            continue  # inside a branch this call does not take
        branch = point.switch.select(given)
        if branch is None:
            options = "; ".join(f"{b.name} (give {', '.join(b.when)})" for b in point.switch.branches)
            return Problem(point.label, "inputs", f"no workflow matches the given inputs. Workflows: {options}")
        chosen[point.path] = branch.name
    return tuple(chosen.items())


def _within(node: Node) -> Choices:
    found: list[tuple[str, str]] = []
    child, parent = node, node.parent
    while parent is not None:
        if isinstance(parent.block, Switch):
            found.append((parent.path, child.key))
        child, parent = parent, parent.parent
    return tuple(reversed(found))


def check_components(plans: Mapping[Choices, Plan], keys: Mapping[str, str], manager: ComponentsManager) -> list[Problem]:
    """Every needed component is given (or optional) and of the declared type, resolved without loading;
    then, when all are, each block's loaded components fit together (:meth:`Block.check_fit`)."""
    problems = _check_types(plans, keys, manager)
    return problems or _check_fit(plans, keys, manager)


def _check_fit(plans: Mapping[Choices, Plan], keys: Mapping[str, str], manager: ComponentsManager) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[str] = set()
    for plan in plans.values():
        for path, block in plan.blocks:
            if path in seen or type(block).check_fit is Block.check_fit:
                continue
            seen.add(path)
            loaded = {name: manager.loaded(keys[name]) for name in block.components() if name in keys}
            try:
                block.check_fit({name: obj for name, obj in loaded.items() if obj is not None})
            except FieldError as err:
                problems.append(Problem(path, err.field, str(err), "", block.declaration_site()))
    return problems


def _check_types(plans: Mapping[Choices, Plan], keys: Mapping[str, str], manager: ComponentsManager) -> list[Problem]:
    problems: list[Problem] = []
    for name, (needed, optional, users) in component_needs(plans).items():
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
        actual = manager.component_type(keys[name])
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


def component_needs(plans: Mapping[Choices, Plan]) -> dict[str, tuple[Any, bool, list[tuple[str, Block]]]]:
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


def check_triggers(points: Iterable[SwitchPoint], plans: Mapping[Choices, Plan]) -> list[Problem]:
    inputs = {name for plan in plans.values() for name in plan.user_inputs}
    problems = []
    for point in points:
        for branch in point.switch.branches:
            for name in branch.when:
                if name not in inputs:
                    problems.append(
                        Problem(
                            point.label,
                            name,
                            f"branch {branch.name!r} is triggered by {name!r}, which no block takes as a user input",
                            "trigger on an input that a block of the branch declares",
                        )
                    )
    return problems


def check_user_inputs(names: Iterable[str], plans: Mapping[Choices, Plan]) -> list[Problem]:
    """Every name a pipeline was told callers pass (``user_inputs=``) is an input of some workflow."""
    inputs = {name for plan in plans.values() for name in plan.user_inputs}
    return [
        Problem(
            "pipeline",
            name,
            "is listed in user_inputs, but no workflow takes it from the caller (a block produces it, or none reads it)",
            f"remove {name!r} from user_inputs",
        )
        for name in names
        if name not in inputs
    ]
