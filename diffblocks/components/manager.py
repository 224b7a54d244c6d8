"""The ComponentsManager: one place that resolves, loads, shares and unloads components."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from diffblocks.components.compiled import unwrap_compiled
from diffblocks.components.devices import usable_device
from diffblocks.components.inventory import ComponentInfo, component_info, format_table
from diffblocks.components.loaders import check_random_weights, load_component
from diffblocks.components.memory import AbstractOffload, MemoryPlan, ModelSize, OnMove, Placement
from diffblocks.components.memory.free import is_auto, measured_budget, own_bytes
from diffblocks.components.memory.oom import OffloadTightened, free_memory
from diffblocks.components.memory.reserve import StepNeed
from diffblocks.components.spec_memory import component_sizes, record_weight_files
from diffblocks.components.specs import ComponentSpec, read_index
from diffblocks.registry import COMPONENTS, Registry, RegistryError


@dataclass
class _Entry:
    key: str
    name: str
    spec: ComponentSpec | None
    obj: Any = None
    users: set[str] = field(default_factory=set)
    cls: type | None = None


class ComponentsManager:
    """Resolves component specs through the registry, loads them on first use and shares them.

    Two pipelines that ask for the same spec (same repository, subfolder, variant, revision and
    dtype) get the same object. Objects added directly are shared by identity. The memory settings
    below can be replaced later, loaded models included, with :meth:`place`.

    Args:
        device: where loaded models are placed (default: CPU).
        registry: the allowlist used to resolve type hints (default: :data:`diffblocks.registry.COMPONENTS`).
        memory_budget: bytes of weights allowed on ``device`` (``"12GiB"``, ``"8 GB"``, an int): models
            then load on the CPU and the planner picks the cheapest offload policy that fits (see
            :meth:`plan` and ``docs/memory.md``). ``"auto"``: 90% of what ``device`` has free when
            the manager is made (:mod:`~diffblocks.components.memory.free`).
        offload: an offload policy to use (``ModelOffload()``, ``GroupOffload(2)``, ...), instead of
            the planner's choice; checked against ``memory_budget`` when both are given.
        on_move: told of each move an offload policy makes (name, device, bytes): for logs and tests.
        activations: bytes of ``memory_budget`` left to activations (``"2GiB"``); weights are planned
            in the rest, and a VAE decode that would not fit what the weights leave runs sliced or
            tiled (see ``docs/memory.md``). Without it, a budget reserves what the largest denoiser
            step a call has run is estimated to need, planned again when a call's size grows.
        cpu_memory_budget: bytes of CPU memory allowed for the models' weights (``"16GiB"``): a plan
            whose home copies would not fit puts them in memory-mapped files (``DiskOffload``), and
            our models load straight into them; below what loading then needs (the largest model
            read through CPU memory, or the largest tensor cast on loading) it fails before loading.
            ``"auto"``: 90% of the memory available when the manager is made.

    Example:
        >>> import torch
        >>> from diffblocks.components import ComponentsManager
        >>> manager = ComponentsManager()
        >>> key = manager.add("proj", torch.nn.Linear(4, 4))
        >>> manager.get(key).in_features
        4
        >>> manager.table()[0].memory_bytes
        80
    """

    def __init__(
        self,
        *,
        device: torch.device | str | None = None,
        registry: Registry | None = None,
        memory_budget: str | int | None = None,
        offload: AbstractOffload | None = None,
        on_move: OnMove | None = None,
        activations: str | int | None = None,
        cpu_memory_budget: str | int | None = None,
    ) -> None:
        self._on_move = on_move
        self._device = usable_device(device) if device is not None else None  # checked before the budget ("auto" reads its free memory)
        self.registry = registry if registry is not None else COMPONENTS
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.RLock()
        self.placement = self._placement(memory_budget, offload, activations, cpu_memory_budget)

    def _placement(
        self, budget: str | int | None, policy: AbstractOffload | None, activations: str | int | None, cpu_budget: str | int | None
    ) -> Placement:
        models = [entry.obj for entry in self._entries.values() if isinstance(entry.obj, torch.nn.Module)]
        for_device, cpu = self._device if self._device is not None else torch.device("cpu"), torch.device("cpu")
        if is_auto(budget):
            budget = measured_budget(for_device, held=own_bytes(models, for_device))
        if is_auto(cpu_budget):
            cpu_budget = measured_budget(cpu, held=own_bytes(models, cpu))
        return Placement(budget=budget, policy=policy, on_move=self._on_move, activations=activations,
                         cpu_budget=cpu_budget, on_step=self._reserve_step, on_tensors=self._attach_again)

    def place(
        self,
        *,
        memory_budget: str | int | None = None,
        offload: AbstractOffload | None = None,
        activations: str | int | None = None,
        cpu_memory_budget: str | int | None = None,
    ) -> ComponentsManager:
        """Place the models anew: a budget, a policy, or neither (every model on the device); returns the manager.

        The arguments mean what they mean to the constructor, and replace all of its memory
        settings. The new plan is made first, so a budget too small (:class:`MemoryBudgetError`)
        or a bad value leaves the placement as it was. Then each loaded model in turn leaves its
        old policy (a forward running it in another thread ends first) and takes the new one;
        models not loaded yet load under it. What a step reserved for activations is estimated
        again at the next call. An error while moving (out of memory) leaves the new placement
        with the models placed so far; the next use places the rest, or ``place()`` again with less.

        Example:
            >>> import torch
            >>> from diffblocks.components.memory import ModelOffload, NoOffload
            >>> manager = ComponentsManager(device="cpu")
            >>> key = manager.add("proj", torch.nn.Linear(1024, 1024))
            >>> manager.place(memory_budget="8MiB").plan().policy
            NoOffload()
            >>> manager.place(offload=ModelOffload()).plan().policy
            ModelOffload()
        """
        with self._lock:
            placement = self._placement(memory_budget, offload, activations, cpu_memory_budget)
            if placement.active:
                placement.make_plan(self._model_sizes, self.device)  # refuses before anything moves
            old, self.placement = self.placement, placement
            for entry in self._entries.values():  # one model at a time: the others keep a policy meanwhile
                if not isinstance(entry.obj, torch.nn.Module):
                    continue
                old.detach(entry.key)  # home, its hooks removed (a forward running it in another thread ends first)
                if placement.active:
                    if not old.active:  # it was simply on the device: home first, where the policy places it from
                        entry.obj.to("cpu")
                    placement.attach(entry.key, entry.name, entry.obj)
                elif self.device is not None:
                    entry.obj.to(self.device)
            old.detach_all()  # the buffers it kept for copying go back
            free_memory()
        return self

    def _place_loaded(self) -> None:
        """Give every loaded model the plan's policy (one already placed keeps it)."""
        for entry in self._entries.values():
            if entry.obj is not None:
                self.placement.attach(entry.key, entry.name, entry.obj)

    def _move_loaded(self, device: torch.device) -> None:
        for entry in self._entries.values():
            if isinstance(entry.obj, torch.nn.Module):
                entry.obj.to(device)

    @property
    def device(self) -> torch.device | None:
        """Where loaded models are placed (None: where they load, the CPU); checked when set (see :func:`~diffblocks.components.devices.usable_device`)."""
        return self._device

    @device.setter
    def device(self, device: torch.device | str | None) -> None:
        self._device = usable_device(device) if device is not None else None
        self.placement.outdated()

    def add(self, name: str, component: Any, *, user: str | None = None) -> str:
        """Register a loaded object or a :class:`ComponentSpec` under ``name``; returns its key.

        Raises:
            ValueError: a model given only as a config, without ``random_weights=True`` in its spec.
        """
        with self._lock:
            if isinstance(component, ComponentSpec):
                if component.name != name:
                    component = component.with_(name=name)
                if component.repo is None and component.type_hint is not None:
                    try:
                        check_random_weights(self.registry.resolve(component.type_hint), component)
                    except RegistryError:
                        pass  # an unknown type is reported, with the allowed ones, when the pipeline is built
                key = component.load_id
                entry = self._entries.get(key)
                if entry is None:
                    entry = self._entries[key] = _Entry(key, name, component)
                    self.placement.outdated()
            else:
                key = f"{name}@{id(component):x}"
                entry = self._entries.get(key)
                if entry is None or entry.obj is not component:
                    cls = type(unwrap_compiled(component))  # a torch.compile wrapper is checked as the model it wraps
                    entry = self._entries[key] = _Entry(key, name, None, component, cls=cls)
                    self.placement.outdated()
            if user is not None:
                entry.users.add(user)
            return key

    def add_from_index(self, path_or_repo: str, *, revision: str | None = None, dtype: str | None = None) -> dict[str, str]:
        """Add every component listed in a repository's index file; returns name -> key."""
        index = read_index(path_or_repo, revision=revision)
        specs = index.components.values()
        return {spec.name: self.add(spec.name, spec.with_(dtype=dtype) if dtype else spec) for spec in specs}

    def get(self, key: str) -> Any:
        """The object for ``key``, loading it now if it is not loaded yet.

        Under a memory budget or an offload policy, the plan is made first (so a budget too small
        fails before anything loads), the model loads on the CPU, and the plan's policy is attached,
        to it and to every loaded model a new plan took its old policy from (a call in another
        thread may be running those).
        """
        entry = self._entry(key)
        placing = self.placement.active
        if placing:
            self.plan()
        if entry.obj is None:
            with self._lock:
                if entry.obj is None:
                    assert entry.spec is not None
                    device = None if placing else self.device  # offloaded models wait on the CPU
                    entry.obj = load_component(self.component_type(key) or object, entry.spec, device=device,
                                               memory_map=self.placement.memory_map() if placing else None)
                    if placing:
                        record_weight_files(entry.obj, entry.spec)
        if placing:
            with self._lock:
                self.plan()  # again: another thread may have changed the models since
                self._place_loaded()
        return entry.obj

    def plan(self) -> MemoryPlan:
        """The placement of every model this manager knows: the policy, what it needs at most, and why.

        Models are measured without loading them where their spec allows (from their config on
        the meta device, or from their safetensors headers); a model shared by several pipelines
        counts once. ``print(manager.plan())`` explains the choice, and what part of the budget it
        left to activations and why: ``activations=`` when given, else the largest denoiser step a
        call has run (``plan.activations``, ``plan.reserved_for``; see
        :mod:`~diffblocks.components.memory.reserve`).

        Raises:
            MemoryBudgetError: the budget is below what the smallest placement needs (the message says how much).
        """
        with self._lock:
            return self.placement.make_plan(self._model_sizes, self.device)

    def relieve_memory(self, where: str, message: str) -> bool:
        """After a step ran out of memory: move the offload policy one rung down the ladder; False if none is left.

        Every loaded model moves home and gets the new policy at once (a running call holds its
        models, so it does not ask for them again); a warning names the step, the old and the new
        policy. See ``docs/memory.md`` and :mod:`diffblocks.components.memory.oom`.
        """
        with self._lock:
            policy = self.placement.tighter()
            if policy is None or self.device is None:  # no device: the models are where their owner put them
                return False
            was_active = self.placement.active
            previous = self.placement.tighten(policy)
            if not was_active:  # every model was simply on the device: send them home before the policy places them
                self._move_loaded(torch.device("cpu"))
            free_memory()
            self.plan()
            self._place_loaded()
        change = f"{policy!r} ({policy.describe()})" if policy != previous else f"{policy!r}, its kept blocks streamed too"
        warnings.warn(
            f"out of memory in block {where!r} on {self.device} ({message}): offload policy {previous!r} -> {change}, "
            "and the step runs again. To start there next time, give the manager "
            f"offload={policy!r} or a memory_budget",
            OffloadTightened,
            stacklevel=2,
        )
        return True

    def _reserve_step(self, need: StepNeed) -> None:
        """A denoiser step is about to run at a size that needs more activations than reserved: plan again with them.

        Loaded models get the new plan's policy at once (the running call holds its models and does
        not ask for them again), before the step's forward.
        """
        with self._lock:
            if not self.placement.reserve(need):
                return
            self.plan()
            self._place_loaded()

    @contextmanager
    def _attach_again(self, key: str) -> Iterator[None]:
        """Around a change of a placed model's tensors (a LoRA): its policy off, every tensor home, then installed afresh."""
        with self._lock:
            entry = self._entry(key)
            self.placement.detach(entry.key)
            try:
                yield
            finally:
                if entry.obj is not None:
                    self.placement.attach(entry.key, entry.name, entry.obj)

    def _model_sizes(self) -> dict[str, ModelSize]:
        return component_sizes([(e.name, e.key, e.obj, e.spec) for e in self._entries.values()], self.component_type)

    def component_type(self, key: str) -> type | None:
        """The component's class, resolved without loading it (None when the spec has no type hint)."""
        entry = self._entry(key)
        if entry.cls is None and entry.spec is not None and entry.spec.type_hint is not None:
            entry.cls = self.registry.resolve(entry.spec.type_hint)
        return entry.cls

    def spec(self, key: str) -> ComponentSpec | None:
        return self._entry(key).spec

    def is_loaded(self, key: str) -> bool:
        return self._entry(key).obj is not None

    def loaded(self, key: str) -> Any:
        """The object for ``key`` if it is loaded, else None; never loads, places or counts a use."""
        return self._entry(key).obj

    def unload(self, key: str) -> None:
        """Drop the loaded object (a spec-backed component reloads on next use) and free its memory."""
        entry = self._entry(key)
        if entry.spec is None:
            raise ValueError(f"{key!r} was added as an object, not a spec, so it could not be reloaded: use remove()")
        with self._lock:  # not placed again by a get() in another thread between the two
            self.placement.detach(entry.key)
            entry.obj = None
        free_memory()

    def remove(self, key: str) -> None:
        """Forget a component entirely."""
        with self._lock:
            entry = self._entries.pop(self._entry(key).key)
            self.placement.detach(entry.key)
            self.placement.outdated()
        free_memory()

    def release(self, key: str, *, user: str) -> None:
        """A user (pipeline) no longer needs ``key``; unused entries are forgotten."""
        entry = self._entries.get(key)
        if entry is None:
            return
        with self._lock:
            entry.users.discard(user)
            if not entry.users:
                self._entries.pop(key)
                self.placement.detach(key)
                self.placement.outdated()

    def to(self, device: torch.device | str) -> ComponentsManager:
        """Move every loaded module to ``device`` (and load later ones there).

        Under a memory budget or an offload policy the models stay where the policy keeps them;
        the next plan places them for the new device.
        """
        with self._lock:
            self.device = device  # the setter checks and converts names
            if not self.placement.active:
                self._move_loaded(self.device)
        return self

    def keys(self) -> list[str]:
        return list(self._entries)

    def table(self) -> list[ComponentInfo]:
        """What is known, what is loaded, where, and how much memory it holds."""
        return [component_info(entry.key, entry.name, entry.obj, cls=entry.cls, spec=entry.spec, users=entry.users)
                for entry in self._entries.values()]

    def __repr__(self) -> str:
        return format_table(self.table())

    def _entry(self, key: str) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            matches = [e for e in self._entries.values() if e.name == key]
            if len(matches) == 1:
                return matches[0]
            known = ", ".join(sorted({e.name for e in self._entries.values()}))
            raise KeyError(f"no component {key!r} in the manager; known names: {known or 'none'}")
        return entry

