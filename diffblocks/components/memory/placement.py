"""A manager's memory: its budget or policy, the current plan, and the policy attached to each loaded model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from functools import partial
from typing import final
from weakref import WeakKeyDictionary

import torch
from torch import nn

from diffblocks.components.memory.activations import set_activation_room
from diffblocks.components.memory.disk import DiskOffload, MemoryMap
from diffblocks.components.memory.measure import ModelSize
from diffblocks.components.memory.planner import LADDER, MemoryBudgetError, MemoryPlan, host_peak, plan_memory
from diffblocks.components.memory.mover import Mover, OnMove
from diffblocks.components.memory.policies import AbstractOffload, Attached, GroupOffload, LeafOffload, ModelOffload, NoOffload
from diffblocks.components.memory.reserve import Grow, StepNeed, watch_steps
from diffblocks.components.memory.sizes import ByteSize

NONE_YET = ("yet: the first denoiser step of a call estimates its own at the call's size, "
            "and the plan is made again with it before that step runs")
"""Why a budget's plan reserves nothing before any call (``plan.reserved_for``)."""


_PLACED: WeakKeyDictionary[nn.Module, Callable[[], AbstractContextManager[None]]] = WeakKeyDictionary()


def changing_tensors(model: nn.Module) -> AbstractContextManager[None]:
    """Around a change of ``model``'s tensors (a LoRA attached or removed): its policy is taken off first and installed afresh after.

    A policy moves the tensors it found when it was installed; taken off, every tensor is home
    while they change, and installed again, the new ones move with the rest. A model no manager
    places is changed as it is.
    """
    again = _PLACED.get(model)
    return again() if again is not None else nullcontext()


@final
class Placement:
    """What :class:`~diffblocks.components.ComponentsManager` keeps for memory (one per manager).

    Inactive (every model simply on the manager's device) unless a budget or a policy is given.
    The plan is made from every model the manager knows, before the first of them is loaded, and
    made again when models are added; a model gets the plan's policy when it is first handed out,
    and again whenever the plan's policy changes.

    Args:
        budget: bytes of weights allowed on the device (``"12GiB"``, ``"8 GB"`` or an int).
        policy: a fixed policy (the planner then only checks it against the budget, if any).
        on_move: told of each move (see :data:`~diffblocks.components.memory.OnMove`).
        activations: bytes of the budget left to activations (``"2GiB"``); weights are planned in the rest.
        cpu_budget: bytes of CPU memory allowed for the weights' home copies (``"16GiB"``); what does
            not fit waits in memory-mapped files (:class:`~diffblocks.components.memory.DiskOffload`).
        on_step: told when a denoiser step needs more activations than the plan reserves (under a
            budget without ``activations``; see :mod:`~diffblocks.components.memory.reserve`): the
            manager reserves it with :meth:`reserve` and places its loaded models afresh.
        on_tensors: given the key of a placed model whose tensors are about to change, a context
            around the change (:func:`changing_tensors`): the manager detaches the model, and attaches it again after.
    """

    def __init__(
        self,
        *,
        budget: str | int | None = None,
        policy: AbstractOffload | None = None,
        on_move: OnMove | None = None,
        activations: str | int | None = None,
        cpu_budget: str | int | None = None,
        on_step: Grow | None = None,
        on_tensors: Callable[[str], AbstractContextManager[None]] | None = None,
    ) -> None:
        if policy is not None and not isinstance(policy, AbstractOffload):
            raise TypeError(
                f"offload={policy!r} is not an offload policy: give NoOffload(), ModelOffload(), GroupOffload(...) or LeafOffload()"
            )
        self.budget = ByteSize.parse(budget) if budget is not None else None
        self.activations = ByteSize.parse(activations) if activations is not None else ByteSize(0)
        if activations is not None and self.budget is None:
            raise ValueError(f"activations={activations!r} reserves part of a memory budget: give memory_budget= too")
        self.cpu_budget = ByteSize.parse(cpu_budget) if cpu_budget is not None else None
        self.policy = policy
        self.on_move = on_move
        # an explicit reservation wins; without one, the largest step a call has run is reserved
        self.on_step = on_step if self.budget is not None and activations is None else None
        self.on_tensors = on_tensors
        self.step: StepNeed | None = None
        self.plan: MemoryPlan | None = None
        self._mover: Mover | None = None
        self._applied: AbstractOffload | None = None
        self._attached: dict[str, Attached] = {}
        self._keep = True  # spend a spare budget on kept blocks; off once an out-of-memory error showed there is none

    @property
    def active(self) -> bool:
        return self.budget is not None or self.policy is not None or self.cpu_budget is not None

    def make_plan(self, sizes: Callable[[], Mapping[str, ModelSize]], device: torch.device | None) -> MemoryPlan:
        """The plan for the models now known (measured only when the plan is out of date)."""
        if self.plan is None:
            target = device if device is not None else torch.device("cpu")
            plan = self._plan(sizes(), str(target))
            if self._mover is None or self._mover.device != target or plan.policy != self._applied or plan.kept != self._mover.keep:
                self.detach_all()  # each model gets the new policy when it is next handed out
                self._mover = Mover(target, on_move=self.on_move)
                self._mover.keep = dict(plan.kept)
            self.plan, self._applied = plan, plan.policy
        return self.plan

    def _plan(self, sizes: Mapping[str, ModelSize], device: str) -> MemoryPlan:
        def make(activations: int) -> MemoryPlan:
            return plan_memory(sizes, device=device, budget=self.budget, policy=self.policy, keep=self._keep,
                               activations=activations, cpu_budget=self.cpu_budget)

        step = self.step
        if step is None and self.on_step is not None:
            return replace(make(self.activations), reserved_for=NONE_YET)
        if step is None or self.budget is None:
            return make(self.activations)
        try:
            return replace(make(step.nbytes), reserved_for=step.why)
        except MemoryBudgetError:
            # No placement leaves the step all of its estimate (which is on the high side): the smallest
            # placement leaves what it can, and an out-of-memory error in the step still has the ladder.
            models = list(sizes.values())
            least = min(each.peak(models) for each in ((self.policy,) if self.policy is not None else LADDER))
            return replace(make(max(self.budget - least, 0)), reserved_for=step.why, needed=step.nbytes)

    def reserve(self, need: StepNeed) -> bool:
        """Reserve ``need`` for activations if it is more than reserved so far; True if the plan must be made again."""
        if self.on_step is None or (self.step is not None and need.nbytes <= self.step.nbytes):
            return False
        self.step, self.plan = need, None
        return True

    def memory_map(self) -> MemoryMap | None:
        """How a model loads under the plan: straight into memory-mapped files under disk offload (None: into CPU memory).

        The maps are taken as disk offload would take them (64-byte aligned for models that compute on
        the CPU), so it keeps them when it attaches, and its folder holds what is written.
        """
        if self.plan is None or self._mover is None or not isinstance(self.plan.policy, DiskOffload):
            return None
        return MemoryMap(folder=self.plan.policy.folder, aligned=self._mover.device.type == "cpu")

    def tighter(self) -> AbstractOffload | None:
        """The policy after the current one on the planner's ladder (None: nothing uses less memory).

        The current policy is the plan's (no plan: ``NoOffload``); one not on the ladder is followed
        by the first rung whose peak is smaller for the models planned. A plan that keeps blocks on
        the device in its spare budget is tightened first to the same policy, keeping none. Under a
        CPU budget, a rung whose home copies would not fit CPU memory becomes disk offload, and disk
        offload tightens only to one group at a time, then to one layer at a time.
        """
        current = self.plan.policy if self.plan is not None and self.active else NoOffload()
        if self.plan is not None and self.plan.kept:
            return current  # the same policy, its kept blocks streamed too
        if isinstance(current, DiskOffload):  # the rungs below keep their homes in CPU memory, which disk offload was chosen to spare
            if current.leaf:
                return None
            if current.prefetch:
                return DiskOffload(current.blocks_per_group, prefetch=False, folder=current.folder)
            return DiskOffload(folder=current.folder, leaf=True)
        if current in LADDER:
            rungs = LADDER[LADDER.index(current) + 1 :]
        else:
            models = list(self.plan.sizes.values()) if self.plan is not None else []
            rungs = tuple(each for each in LADDER if each.peak(models) < current.peak(models))
        rung = rungs[0] if rungs else None
        if rung is not None and self.cpu_budget is not None and self.plan is not None:
            if host_peak(rung, list(self.plan.sizes.values())) > self.cpu_budget:  # its homes would not fit CPU memory
                if isinstance(rung, LeafOffload):
                    return DiskOffload(leaf=True)
                return DiskOffload(1, prefetch=isinstance(rung, ModelOffload) or rung == GroupOffload(1))
        return rung

    def tighten(self, policy: AbstractOffload) -> AbstractOffload:
        """Use ``policy`` from now on (models get it when the plan is next made); returns the policy it replaces."""
        previous = self.plan.policy if self.plan is not None and self.active else NoOffload()
        self.policy, self._keep = policy, False
        self.detach_all()  # every model home: the new policy places them afresh
        self.plan = None
        return previous

    def outdated(self) -> None:
        """Models were added, removed or moved: plan again before the next model is handed out."""
        self.plan = None

    def attach(self, key: str, name: str, model: object) -> None:
        """Give ``model`` the plan's policy, once (a model that is not an ``nn.Module`` has no weights to place).

        One model under several keys (names, pipelines) is placed once, under the first: the plan counted it once.
        """
        if key in self._attached or not isinstance(model, nn.Module) or self.plan is None or self._mover is None:
            return
        if any(attached.model is model for attached in self._attached.values()):
            return
        self._attached[key] = self.plan.policy.attach(name, model, self._mover)
        if self.on_tensors is not None:
            _PLACED[model] = partial(self.on_tensors, key)
        if self.on_step is not None:
            watch_steps(model, name, self.on_step)
        # what the weights leave of the budget while this model runs: the room a decode sizes itself to
        set_activation_room(model, self._room(name), self._mover.make_room)

    def _room(self, name: str) -> int | None:
        if self.budget is None or self.plan is None:
            return None
        size, sizes = self.plan.sizes.get(name), list(self.plan.sizes.values())
        kept = sum(self.plan.kept.values())  # counted in the plan's peak, not in the policy's own
        resident = self.plan.policy.peak_while(size, sizes) + kept if size is not None else self.plan.peak
        return self.budget - resident

    def detach(self, key: str) -> None:
        attached = self._attached.pop(key, None)
        if attached is not None:
            _PLACED.pop(attached.model, None)
            attached.detach()
            set_activation_room(attached.model, None)
            watch_steps(attached.model, attached.name, None)

    def detach_all(self) -> None:
        for key in list(self._attached):
            self.detach(key)
        if self._mover is not None:
            self._mover.streams.clear()  # no group is streamed now: the buffers kept for copying go back
