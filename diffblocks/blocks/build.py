"""One version of a pipeline: its block tree compiled into checked plans, and the components bound for calls.

:func:`compile_build` is where building a pipeline checks everything at once (every workflow's
data flow, the switch triggers, the declared user inputs, the components) and reports it in one
:class:`~diffblocks.blocks.errors.PlanError`; a :class:`Build` is what passes. Changing a
pipeline's tree or components compiles a new one, and a call keeps the one it started with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, final

from diffblocks.blocks.block import AbstractBlock
from diffblocks.blocks.checks import SwitchPoint, check_components, check_triggers, check_user_inputs, choose_workflow, switch_points
from diffblocks.blocks.errors import InputError, PlanError, Problem
from diffblocks.blocks.plan import Choices, Plan, compile_plan, expand_workflows
from diffblocks.blocks.tree import copy_tree
from diffblocks.components.manager import ComponentsManager


@final
@dataclass(eq=False)
class Build:
    """One version of a pipeline: its tree, plans and component keys, and the components its blocks read.

    Changing the components or the tree makes a new version; a call keeps the version it started
    with, so a call started after ``update_components`` runs with the new components while one in
    flight finishes with the old. ``bound`` holds the components while ``callers`` calls use them.
    """

    root: AbstractBlock
    plans: dict[Choices, Plan]
    switches: tuple[SwitchPoint, ...]
    keys: dict[str, str]
    bound: dict[str, Any] = field(default_factory=dict)
    callers: int = 0

    @property
    def input_names(self) -> frozenset[str]:
        """The inputs any workflow takes from callers."""
        return frozenset(name for plan in self.plans.values() for name in plan.user_inputs)

    def select(self, given: frozenset[str]) -> Plan:
        """The plan of the workflow that the inputs ``given`` pick.

        Raises:
            InputError: a switch has no branch for the inputs given.
        """
        choices = choose_workflow(self.switches, given)
        if isinstance(choices, Problem):
            raise InputError([choices])
        return self.plans[choices]


def compile_build(
    blocks: AbstractBlock, keys: Mapping[str, str], *, manager: ComponentsManager, user_inputs: Iterable[str], name: str
) -> Build:
    """Compile ``blocks`` (a copy of them) with the components ``keys`` names in ``manager``, and bind its leaves.

    Raises:
        PlanError: every problem found in every workflow, at once, in the context of pipeline ``name``.
    """
    user_inputs = tuple(user_inputs)
    root = copy_tree(blocks)  # the pipeline's own leaves: binding them never reaches the caller's tree
    plans: dict[Choices, Plan] = {}
    problems: list[Problem] = []
    for choices in expand_workflows(root):
        plans[choices], found = compile_plan(choices, root, user_inputs=user_inputs)
        problems += [p for p in found if p not in problems]
    switches = switch_points(root)
    problems += check_triggers(switches, plans)
    problems += check_user_inputs(user_inputs, plans)
    problems += check_components(plans, keys, manager)
    if problems:
        raise PlanError(problems, context=f"pipeline {name!r}")
    build = Build(root, plans, switches, dict(keys))
    for plan in plans.values():
        for _, block in plan.blocks:
            block.bind(build.bound)
    return build


__all__ = ["Build", "compile_build"]
