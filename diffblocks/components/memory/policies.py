"""Offload policies: where a model's weights wait while other models run, and when they move in.

A policy is a frozen value (compared and hashed by value, like a guider); :meth:`attach` installs
forward hooks on one model and returns an :class:`Attached` whose ``detach()`` removes them and
moves every tensor back home, leaving the model as it was. Moves go through the manager's one
:class:`~diffblocks.components.memory.mover.Mover`.

The policies, from cheapest to smallest (the planner tries them in this order):

- :class:`NoOffload`: every model lives on the device.
- :class:`ModelOffload`: a model moves to the device when one of its layers first runs, and the
  model that was there moves home (diffusers' ``enable_model_cpu_offload``).
- :class:`GroupOffload`: a model's repeated blocks (its outermost ``nn.ModuleList`` entries) move
  in ``blocks_per_group`` at a time as they run and back after, the next group copied from pinned
  memory on a side stream while one computes (:mod:`~diffblocks.components.memory.streams`); the
  rest stays on the device (diffusers' ``apply_group_offloading``, ``offload_type="block_level"``,
  ``use_stream=True``).
- :class:`LeafOffload`: each layer's own tensors move in just before it runs and back after
  (``offload_type="leaf_level"``): the least memory, the most traffic.

Calls in several threads may share a manager's models, so what a running forward reads is counted,
and moves home only when no call uses it any more: a model under :class:`ModelOffload` (another
model waits for the device rather than sending it home; :meth:`Mover.pin`), a streamed group
(:class:`~diffblocks.components.memory.streams.Prefetcher`), a layer under :class:`LeafOffload`.
Each thread keeps its own count, so a forward that fails releases exactly what it held.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, final
from weakref import WeakKeyDictionary

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from diffblocks.components.memory.kept import KeptGroups
from diffblocks.components.memory.measure import ModelSize, repeated_blocks
from diffblocks.components.memory.mover import Mover, tensors_of
from diffblocks.components.memory.streams import Prefetcher, StreamedGroup, Synchronous



_RUNS_ON: WeakKeyDictionary[nn.Module, torch.device] = WeakKeyDictionary()


def execution_device(model: nn.Module) -> torch.device | None:
    """Where ``model`` runs under an offload policy (None: no policy; it runs where its weights are).

    Blocks make the tensors they hand a model here, not where its weights wait between calls.
    """
    return _RUNS_ON.get(model)


@final
class Attached:
    """A policy installed on one model: ``detach()`` removes its hooks and moves its tensors home."""

    def __init__(
        self, name: str, model: nn.Module, mover: Mover, handles: Sequence[RemovableHandle], *, prefetcher: Prefetcher | None = None
    ) -> None:
        self.name, self.model, self.mover, self.handles, self.prefetcher = name, model, mover, tuple(handles), prefetcher
        _RUNS_ON[model] = mover.device

    def detach(self) -> None:
        with self.mover.lock:
            # a call running the model finishes its forward first, its hooks still in place to end it
            self.mover.wait_unused(self.model)
            _RUNS_ON.pop(self.model, None)
            for handle in self.handles:
                handle.remove()
            if self.prefetcher is not None:
                self.prefetcher.release_all()
            kept = self.mover.kept.pop(self.model, None)
            if kept is not None:
                kept.release_all()
            whole = self.mover.resident.pop(self.model, None)
            if whole is not None:
                whole.release()
            self.mover.move(self.name, [self.model], self.mover.home)


class AbstractOffload(ABC):
    """Where a model's weights wait and when they move to the device (see the module docstring)."""

    @abstractmethod
    def peak(self, sizes: Sequence[ModelSize]) -> int:
        """The most bytes of weights that these models, all under this policy, hold on the device at once."""

    @abstractmethod
    def attach(self, name: str, model: nn.Module, mover: Mover) -> Attached:
        """Install this policy on ``model`` (named ``name`` in moves and errors)."""

    def peak_while(self, size: ModelSize, sizes: Sequence[ModelSize]) -> int:
        """The most bytes of weights on the device while the model of ``size`` (one of ``sizes``) runs: what its activations cannot use."""
        return self.peak(sizes)

    def describe(self) -> str:
        return repr(self)


@final
@dataclass(frozen=True)
class NoOffload(AbstractOffload):
    """Every model lives on the device: no traffic, the most memory."""

    def peak(self, sizes: Sequence[ModelSize]) -> int:
        return sum(size.total for size in sizes)

    def attach(self, name: str, model: nn.Module, mover: Mover) -> Attached:
        mover.move(name, [model], mover.device)
        return Attached(name, model, mover, ())

    def describe(self) -> str:
        return "every model lives on the device"


@final
@dataclass(frozen=True)
class ModelOffload(AbstractOffload):
    """One model on the device at a time: a model moves in when one of its layers runs, the previous one moves home.

    A model stays on the device until another needs it, so the denoiser moves once per call, not
    once per step. A model is pinned while a forward runs it (:meth:`Mover.pin`): a call that
    needs another model then waits for that forward to end instead of sending the model home
    under it, so concurrent calls take turns on the device, a forward at a time. A call that
    needs a second model inside a forward of the first (it cannot wait for itself) brings it in
    beside the first.
    """

    def peak(self, sizes: Sequence[ModelSize]) -> int:
        return max((size.total for size in sizes), default=0)

    def peak_while(self, size: ModelSize, sizes: Sequence[ModelSize]) -> int:
        return size.total  # the others went home when it came in

    def attach(self, name: str, model: nn.Module, mover: Mover) -> Attached:
        # the whole model as one group: its home pinned once, so moving in is a fast copy and going home copies nothing
        whole = StreamedGroup(name, [model], mover.streams.kept())

        def bring(holding: bool) -> None:  # under the mover's lock
            while model not in mover.resident:
                if not holding and any(mover.users.get(id(other)) for other in mover.resident):
                    mover.freed.wait()  # another call's forward runs its model: wait for it, do not move it
                    continue
                for other, group in list(mover.resident.items()):
                    if not mover.users.get(id(other)):
                        group.release()
                        mover.report(group.label, mover.home, group.nbytes)
                        del mover.resident[other]
                whole.fetch()
                whole.wait()
                mover.report(name, mover.device, whole.nbytes)
                mover.resident[model] = whole

        def enter(_module: nn.Module, _args: Any) -> None:
            mover.pin(model, bring)

        def leave(_module: nn.Module, _args: Any, _output: Any) -> None:
            mover.unpin(model)

        def enter_layer(_module: nn.Module, _args: Any) -> None:
            if not torch.compiler.is_compiling():  # a compiled region runs inside the model's forward, pinned by it
                mover.pin(model, bring)

        def leave_layer(_module: nn.Module, _args: Any, _output: Any) -> None:
            if not torch.compiler.is_compiling():
                mover.unpin(model)

        # The model's forward pins it for its whole run (compiled whole, dynamo runs these hooks
        # eagerly: a lock cannot be traced); every layer that holds tensors pins it too, since a model
        # may be entered by a method other than forward (vae.decode). In a forward, a layer's pin is a count.
        handles = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True)]
        for sub in _holders(model):
            handles += [sub.register_forward_pre_hook(enter_layer), sub.register_forward_hook(leave_layer, always_call=True)]
        return Attached(name, model, mover, handles)

    def describe(self) -> str:
        return "one model on the device at a time, moved in when it runs"


@final
@dataclass(frozen=True)
class GroupOffload(AbstractOffload):
    """A model's repeated blocks move in ``blocks_per_group`` at a time as they run; the rest stays on the device.

    Each group waits in pinned CPU memory (pinned once, when attached) and, from the second call
    on, the group that ran next last time is copied on a side stream while this one computes
    (:class:`~diffblocks.components.memory.streams.Prefetcher`); sending a group home copies nothing.
    Groups worth ``mover.keep[name]`` bytes (the plan's spare budget) stay on the device instead,
    spread evenly through the model, so each streamed group's copy hides behind the compute of
    the kept groups before it.

    Args:
        blocks_per_group: consecutive entries of one ``nn.ModuleList`` that move together (>= 1).
        prefetch: fetch the next group while one runs (two groups on the device at once, counted in
            :meth:`peak`); False fetches each group when it is needed, one at a time.
    """

    blocks_per_group: int = 1
    prefetch: bool = field(default=True, repr=False)  # shown only when off, see __repr__

    def __post_init__(self) -> None:
        if self.blocks_per_group < 1:
            raise ValueError(f"GroupOffload: blocks_per_group {self.blocks_per_group} must be >= 1")

    def __repr__(self) -> str:
        return f"GroupOffload(blocks_per_group={self.blocks_per_group}" + (")" if self.prefetch else ", prefetch=False)")

    def peak(self, sizes: Sequence[ModelSize]) -> int:
        resident = sum(size.outside_blocks for size in sizes)
        return resident + max((self._streamed(size) for size in sizes), default=0)

    def _streamed(self, size: ModelSize) -> int:
        group = size.largest_group(self.blocks_per_group)
        # prefetching: the running group and the one fetched ahead, at most every block
        return min(2 * group, sum(sum(each) for each in size.blocks)) if self.prefetch else group

    def attach(self, name: str, model: nn.Module, mover: Mover) -> Attached:
        return attach_groups(name, model, mover, blocks_per_group=self.blocks_per_group, prefetch=self.prefetch, streams=mover.streams)

    def describe(self) -> str:
        ahead = ", the next group copied while one runs" if self.prefetch else ""
        return f"repeated blocks stream in {self.blocks_per_group} at a time{ahead}; the rest stays on the device"


@final
@dataclass(frozen=True)
class LeafOffload(AbstractOffload):
    """Each layer's own tensors move in just before it runs and back after: the least memory, the most traffic."""

    def peak(self, sizes: Sequence[ModelSize]) -> int:
        return max((size.largest_leaf for size in sizes), default=0)

    def attach(self, name: str, model: nn.Module, mover: Mover) -> Attached:
        handles = _pinned_forward(model, mover)
        for sub_name, sub in model.named_modules():
            if any(True for _ in tensors_of(sub, recurse=False)):
                handles += _stream(f"{name}/{sub_name or '(top)'}", [sub], mover, recurse=False)
        return Attached(name, model, mover, handles)

    def describe(self) -> str:
        return "each layer's tensors move in as it runs and back after"


def attach_groups(
    name: str, model: nn.Module, mover: Mover, *, blocks_per_group: int, prefetch: bool, streams: Synchronous
) -> Attached:
    """Group offload of ``model``: its repeated blocks streamed through ``streams``, the rest moved to the device.

    The home of each streamed group is whatever tensors the model holds when this is called (pinned
    by ``streams``): CPU tensors for :class:`GroupOffload`, views of a memory-mapped file for
    :class:`~diffblocks.components.memory.disk.DiskOffload`.
    """
    names = {id(m): n for n, m in model.named_modules()}
    every: list[tuple[str, list[nn.Module]]] = []
    for blocks in repeated_blocks(model):
        entries = list(blocks)
        for start in range(0, len(entries), blocks_per_group):
            group = entries[start : start + blocks_per_group]
            label = f"{name}/{names[id(group[0])]}" + (f"..{names[id(group[-1])].rsplit('.', 1)[-1]}" if len(group) > 1 else "")
            every.append((label, group))
    kept = _spread([sum(_nbytes(block) for block in group) for _, group in every], mover.keep.get(name, 0))
    grouped = {id(m) for _, group in every for block in group for m in block.modules()}
    mover.move(f"{name}/(outside blocks)", [m for m in model.modules() if id(m) not in grouped], mover.device, recurse=False)
    groups = [(group, StreamedGroup(label, group, streams)) for i, (label, group) in enumerate(every) if i not in kept]
    prefetcher = Prefetcher([streamed for _, streamed in groups], mover, prefetch=prefetch)
    held = [(label, group) for i, (label, group) in enumerate(every) if i in kept]
    keeping = KeptGroups([StreamedGroup(label, group, streams.kept()) for label, group in held], prefetcher.moved,
                         device=mover.device, home=mover.home)
    handles: list[RemovableHandle] = []
    for group, streamed in groups:
        handles.append(group[0].register_forward_pre_hook(lambda _m, _a, s=streamed: prefetcher.enter(s)))
        handles.append(group[-1].register_forward_hook(lambda _m, _a, _o, s=streamed: prefetcher.leave(s), always_call=True))

    # A kept group pins its model while it runs, bringing back what was lent: a model entered by a
    # method other than forward (vae.decode) is neither lent under it nor run with a group at home.
    # Inside a compiled region the model's forward has pinned it already (and a lock cannot be traced).
    def enter_kept(_module: nn.Module, _args: Any) -> None:
        if not torch.compiler.is_compiling():
            mover.pin(model, lambda _holding: keeping.ensure())

    def leave_kept(_module: nn.Module, _args: Any, _output: Any) -> None:
        if not torch.compiler.is_compiling():
            mover.unpin(model)

    for _, group in held:
        handles += [group[0].register_forward_pre_hook(enter_kept), group[-1].register_forward_hook(leave_kept, always_call=True)]
    if keeping.groups:
        with mover.lock:
            keeping.ensure()
            mover.kept[model] = keeping
    # a forward that fails inside a group leaves it unended: the forward's end ends them
    handles += _pinned_forward(model, mover, first=keeping.ensure if keeping.groups else None, then=prefetcher.finish)
    return Attached(name, model, mover, handles, prefetcher=prefetcher)


def attach_leaves(name: str, model: nn.Module, mover: Mover, *, streams: Synchronous) -> Attached:
    """Each layer's own tensors streamed through ``streams`` just before it runs and dropped after it: one group per layer.

    As :class:`LeafOffload` (nothing stays on the device), but with the home left where
    ``streams`` keeps it (a memory-mapped file under :class:`~diffblocks.components.memory.disk.DiskOffload`):
    a dropped layer goes back to the same home tensors, so going home copies nothing.
    """
    names = {id(sub): sub_name for sub_name, sub in model.named_modules()}
    layers = [(f"{name}/{names[id(sub)] or '(top)'}", sub) for sub in _holders(model)]
    groups = [StreamedGroup(label, [sub], streams, recurse=False) for label, sub in layers]
    prefetcher = Prefetcher(groups, mover, prefetch=False)
    handles = _pinned_forward(model, mover, then=prefetcher.finish)  # first: pinned before the top layer's own tensors come in
    for (_, sub), group in zip(layers, groups):
        handles.append(sub.register_forward_pre_hook(lambda _m, _a, g=group: prefetcher.enter(g)))
        handles.append(sub.register_forward_hook(lambda _m, _a, _o, g=group: prefetcher.leave(g), always_call=True))
    return Attached(name, model, mover, handles, prefetcher=prefetcher)


def _pinned_forward(
    model: nn.Module, mover: Mover, *, first: Callable[[], None] | None = None, then: Callable[[], None] | None = None
) -> list[RemovableHandle]:
    """Hooks that pin ``model`` while a forward runs it (so ``detach`` waits for it), calling ``first`` once it is pinned and ``then`` when it ends.

    A model compiled whole is pinned too: dynamo runs these hooks eagerly (a lock cannot be traced).
    Not ``torch.compiler.disable``: that imports dynamo, which costs a process without compiling
    about 70 MiB of memory.
    """
    def enter(_module: nn.Module, _args: Any) -> None:
        mover.pin(model)
        if first is not None:
            with mover.lock:
                first()

    def leave(_module: nn.Module, _args: Any, _output: Any) -> None:
        if then is not None:
            then()
        mover.unpin(model)

    return [model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True)]


def _stream(label: str, group: list[nn.Module], mover: Mover, *, recurse: bool = True) -> list[RemovableHandle]:
    """Hooks that move ``group`` in before its first module runs and home after its last one has.

    Counted like a model under :class:`ModelOffload` (a key of its own stands for it): a
    group that calls in other threads are running stays on the device until the last one is done.
    """
    key = object()  # not the module: a model's own tensors are a layer of it, pinned apart from its forward

    def bring(_module: nn.Module, _args: Any) -> None:
        def move_in(_holding: bool) -> None:
            if not mover.users.get(id(key)):
                mover.move(label, group, mover.device, recurse=recurse)

        mover.pin(key, move_in)

    def send(_module: nn.Module, _args: Any, _output: Any) -> None:
        with mover.lock:
            mover.unpin(key)
            if not mover.users.get(id(key)):
                mover.move(label, group, mover.home, recurse=recurse)

    return [group[0].register_forward_pre_hook(bring), group[-1].register_forward_hook(send, always_call=True)]


def _spread(sizes: list[int], allowance: int) -> set[int]:
    """The most groups (indices into ``sizes``), spread evenly, whose bytes fit ``allowance``."""
    count = len(sizes)
    for keep in range(count, 0, -1):
        chosen = {int((j + 0.5) * count / keep) for j in range(keep)}
        if sum(sizes[i] for i in chosen) <= allowance:
            return chosen
    return set()


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(module, recurse=True))


def _holders(model: nn.Module) -> list[nn.Module]:
    return [sub for sub in model.modules() if any(True for _ in tensors_of(sub, recurse=False))]

