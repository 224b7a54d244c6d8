"""Build-time checks beyond the data flow: components present and typed, switch triggers that exist."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from diffblocks.blocks.block import AbstractBlock, Block
from diffblocks.blocks.compat import describe_type
from diffblocks.blocks.composites import Sequence, Switch
from diffblocks.blocks.errors import Problem
from diffblocks.blocks.plan import Plan
from diffblocks.components.manager import ComponentsManager

Choices = tuple[tuple[str, str], ...]


def check_components(plans: Mapping[Choices, Plan], keys: Mapping[str, str], manager: ComponentsManager) -> list[Problem]:
    """Every needed component is given (or optional) and of the declared type, resolved without loading."""
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


def check_triggers(root: AbstractBlock, plans: Mapping[Choices, Plan]) -> list[Problem]:
    inputs = {name for plan in plans.values() for name in plan.user_inputs}
    problems = []
    for path, switch in switches(root, ""):
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


def switches(block: AbstractBlock, path: str) -> Iterable[tuple[str, Switch]]:
    if isinstance(block, Switch):
        yield path or block.name, block
        for branch in block.branches:
            yield from switches(branch.block, _join(path or block.name, branch.name))
    elif isinstance(block, Sequence):
        for child in block:
            yield from switches(child, _join(path, child.name))


def copy_tree(block: AbstractBlock) -> AbstractBlock:
    if isinstance(block, Switch):
        clone = copy.copy(block)
        clone.branches = tuple(type(b)(b.name, copy_tree(b.block), b.when) for b in block.branches)
        return clone
    if isinstance(block, Sequence):
        clone = copy.copy(block)
        clone._blocks = {name: copy_tree(child) for name, child in block._blocks.items()}
        return clone
    clone = copy.copy(block)
    if isinstance(clone, Block):
        clone._bound = {}
    return clone


def choose_workflow(block: AbstractBlock, given: frozenset[str], path: str, choices: list[tuple[str, str]]) -> Problem | None:
    if isinstance(block, Switch):
        branch = block.select(given)
        if branch is None:
            options = "; ".join(f"{b.name} (give {', '.join(b.when)})" for b in block.branches)
            return Problem(path or block.name, "inputs", f"no workflow matches the given inputs. Workflows: {options}")
        choices.append((path, branch.name))
        return choose_workflow(branch.block, given, _join(path, branch.name), choices)
    if isinstance(block, Sequence):
        for child in block:
            problem = choose_workflow(child, given, _join(path, child.name), choices)
            if problem is not None:
                return problem
    return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
