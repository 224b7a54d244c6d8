"""The planner: the cheapest offload policy whose peak fits the budget, and why."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import final

from diffblocks.components.memory.measure import ModelSize
from diffblocks.components.memory.disk import DiskOffload
from diffblocks.components.memory.policies import AbstractOffload, GroupOffload, LeafOffload, ModelOffload, NoOffload
from diffblocks.components.memory.sizes import ByteSize

LADDER: tuple[AbstractOffload, ...] = (
    NoOffload(),
    ModelOffload(),
    GroupOffload(blocks_per_group=1),
    GroupOffload(blocks_per_group=1, prefetch=False),  # one group less on the device, its copies no longer hidden
    LeafOffload(),
)
"""The policies the planner tries, cheapest (least traffic, then least waiting on it) first."""

_MSG_BELOW = (
    "memory budget {budget} on {device} is below the smallest placement of {count} model(s) ({names}): "
    "{policy!r} needs at least {minimum}{why}. Raise memory_budget to at least {minimum}, quantize the largest "
    "model (pipe.quantize(...), see docs/quantization.md), or run on a device with more memory"
)


_MSG_CPU_BELOW = "cpu_memory_budget {cpu_budget} is below {minimum}, {why}. Raise cpu_memory_budget to at least {minimum}"
_WHY_READ = (
    "the size of {what}, which is read into CPU memory when it loads (only our own models, from local safetensors "
    "folders, load straight into a memory-mapped file under disk offload)"
)
_WHY_MAPPED = (
    "the largest tensor of {name}, which is made in CPU memory while {name} loads straight into a memory-mapped file "
    "under disk offload (a weight cast to the dtype it loads as; the casts are made one at a time)"
)
_OR_QUANTIZE = ", or quantize {name} (pipe.quantize(...), see docs/quantization.md)"


class MemoryBudgetError(ValueError):
    """The budget is smaller than the least any policy needs; raised before any model is loaded."""


@final
@dataclass(frozen=True)
class MemoryPlan:
    """A placement chosen for a budget: the policy, what it needs at most, and what each other policy would need.

    Attributes:
        device: where the models run.
        budget: the bytes allowed there (None: no budget, the policy was given).
        policy: the chosen policy.
        peak: the most bytes of weights the chosen policy holds on the device at once.
        sizes: each model's measured size, by component name (a shared component appears once).
        tried: each policy considered, in order, with its peak.
        kept: under group offload, the bytes of each model's repeated blocks kept on the device
            (not streamed), from the budget the policy leaves spare; counted in ``peak``.
        cpu_budget: the bytes of CPU memory allowed for the models' weights (None: no CPU budget).
        host: the most bytes of weights the chosen policy holds in CPU memory (see :func:`host_peak`).
        instead: the policy the device budget alone chose, when the CPU budget made the plan put
            the weights' home on disk instead (None: it did not).
        activations: the bytes of ``budget`` left to activations; the weights were planned in the rest.
        reserved_for: why (empty: none reserved, or ``activations=`` given): the step of the
            largest call so far, see :mod:`~diffblocks.components.memory.reserve`; before any
            call, under a budget alone, when the reservation will be made.
        needed: what that step is estimated to need, when no placement leaves that much and
            ``activations`` is less (0: it is all reserved).
    """

    device: str
    budget: ByteSize | None
    policy: AbstractOffload
    peak: ByteSize
    sizes: Mapping[str, ModelSize]
    tried: tuple[tuple[AbstractOffload, ByteSize], ...]
    kept: Mapping[str, int] = field(default_factory=dict)
    cpu_budget: ByteSize | None = None
    host: ByteSize | None = None
    instead: AbstractOffload | None = None
    activations: ByteSize = ByteSize(0)
    reserved_for: str = ""
    needed: ByteSize = ByteSize(0)

    def __str__(self) -> str:
        total = ByteSize(sum(size.total for size in self.sizes.values()))
        budget = f"budget {self.budget}" if self.budget is not None else "no budget"
        lines = [f"{len(self.sizes)} model(s), {total} of weights, on {self.device} ({budget})"]
        lines += [f"  {name:<16} {ByteSize(size.total)!s:>10}" for name, size in sorted(self.sizes.items())]
        if self.activations or self.needed:
            lines.append(f"  {self.activations} of the budget reserved for activations: "
                         + (self.reserved_for or "activations= given"))
            if self.needed > self.activations:
                lines.append(f"  (of {self.needed} estimated: no placement leaves more; an out-of-memory error tightens the plan further)")
        elif self.reserved_for:
            lines.append(f"  nothing reserved for activations {self.reserved_for}")
        weights = self.budget - self.activations if self.budget is not None else None
        for policy, peak in self.tried:
            mark = "->" if policy == self.policy else "  "
            verdict = "fits" if weights is None or peak <= weights else "does not fit"
            lines.append(f"{mark} {policy!r}: {peak} at most on {self.device}, {verdict}")
        if self.instead is not None:
            lines.append(f"   {self.instead!r} fits {self.device} but keeps {ByteSize(host_peak(self.instead, list(self.sizes.values())))} "
                         f"of weights in CPU memory, over the CPU budget {self.cpu_budget}: their home is a memory-mapped file instead")
        lines.append(f"chosen: {self.policy!r}: {self.policy.describe()}")
        if self.cpu_budget is not None:
            lines.append(f"  {self.host} at most of weights in CPU memory (CPU budget {self.cpu_budget})")
        lines += [f"  and up to {ByteSize(kept)} of {name}'s repeated blocks stay on the device (whole groups), in the spare budget"
                  for name, kept in self.kept.items()]
        return "\n".join(lines)


def plan_memory(
    sizes: Mapping[str, ModelSize],
    *,
    device: str,
    budget: ByteSize | None = None,
    policy: AbstractOffload | None = None,
    ladder: Sequence[AbstractOffload] = LADDER,
    keep: bool = True,
    activations: int = 0,
    cpu_budget: ByteSize | None = None,
) -> MemoryPlan:
    """The first policy of ``ladder`` (or the given ``policy``) whose peak fits ``budget``.

    Each model counts once however many pipelines use it: ``sizes`` is keyed by component. With
    ``keep``, a group-offload plan spends the budget it leaves spare on keeping repeated blocks on
    the device, so fewer are streamed each step: the largest model's first (the denoiser, which
    runs every step, in every family we ship but the tiny one), then the next. ``activations``
    bytes of the budget are left to activations: weights get the rest.

    With a ``cpu_budget``, a policy whose home copies of the weights would not fit CPU memory
    (:func:`host_peak`) is replaced by :class:`~diffblocks.components.memory.DiskOffload`, whose
    home is a memory-mapped file: streaming groups where they fit the device, else one layer at a time.

    Raises:
        MemoryBudgetError: nothing fits; the message says the least any policy needs. Also a
            ``cpu_budget`` below what loading the models needs (:func:`host_peak` of disk offload).

    Example:
        >>> from diffblocks.components.memory import ByteSize, ModelSize
        >>> sizes = {"unet": ModelSize(6 * 2**30, blocks=((2**30,) * 5,), largest_leaf=2**27),
        ...          "text_encoder": ModelSize(2**30, largest_leaf=2**26)}
        >>> plan_memory(sizes, device="cuda", budget=ByteSize.parse("7GiB")).policy
        NoOffload()
        >>> plan_memory(sizes, device="cuda", budget=ByteSize.parse("4GiB")).policy
        GroupOffload(blocks_per_group=1)
    """
    models = list(sizes.values())
    if cpu_budget is not None:
        _check_cpu_budget(sizes, cpu_budget, policy)
    tried = tuple((each, ByteSize(each.peak(models))) for each in ((policy,) if policy is not None else ladder))
    weights = ByteSize(max(budget - activations, 0)) if budget is not None else None
    for each, peak in tried:
        if weights is None or peak <= weights:
            chosen, instead = each, None
            if cpu_budget is not None and host_peak(each, models) > cpu_budget:  # only a policy of the ladder gets here
                chosen, instead = _on_disk(each, models, weights), each
                peak = ByteSize(chosen.peak(models))
                tried += ((chosen, peak),)
            streams = isinstance(chosen, GroupOffload) or (isinstance(chosen, DiskOffload) and not chosen.leaf)
            kept = _kept(sizes, weights - peak) if keep and weights is not None and streams else {}
            host = ByteSize(host_peak(chosen, models)) if cpu_budget is not None else None
            return MemoryPlan(device, budget, chosen, ByteSize(peak + sum(kept.values())), dict(sizes), tried, kept,
                              cpu_budget=cpu_budget, host=host, instead=instead,
                              activations=ByteSize(activations if budget is not None else 0))
    smallest, minimum = min(tried, key=lambda pair: pair[1])
    biggest = max(sizes.items(), key=lambda item: item[1].total)
    why = f" (largest model: {biggest[0]}, {ByteSize(biggest[1].total)})" if biggest else ""
    if activations:
        minimum = ByteSize(minimum + activations)
        why += f" plus the {ByteSize(activations)} reserved for activations"
    raise MemoryBudgetError(
        _MSG_BELOW.format(budget=budget, device=device, count=len(sizes), names=", ".join(sorted(sizes)),
                          policy=smallest, minimum=minimum, why=why)
    )


def host_peak(policy: AbstractOffload, sizes: Sequence[ModelSize]) -> int:
    """The most bytes of the models' weights that ``policy`` holds in CPU memory at once, on the high side.

    Under :class:`DiskOffload` a model loads straight into a memory-mapped file where it can,
    holding its largest tensor at most (:attr:`ModelSize.loading`), and is mapped from a file once
    loaded where it cannot; so the most is one model's :attr:`ModelSize.loading_peak`. Under
    :class:`NoOffload` each model is read into CPU memory and moved to the device: the largest
    model. The other policies keep a home copy of every model there.
    """
    if isinstance(policy, DiskOffload):
        return max((size.loading_peak for size in sizes), default=0)
    if isinstance(policy, NoOffload):
        return max((size.total for size in sizes), default=0)
    return sum(size.total for size in sizes)


def _on_disk(policy: AbstractOffload, models: Sequence[ModelSize], weights: int | None) -> DiskOffload:
    """Disk offload in place of ``policy`` (a rung that fits the device): prefetching if that fits, else one group at a time, else a layer at a time.

    A layer at a time needs no more of the device than any rung (the largest layer lies in a
    model, outside its blocks or in one of them), so it fits wherever ``policy`` does.
    """
    for each in (DiskOffload(1), DiskOffload(1, prefetch=False)):
        if isinstance(policy, GroupOffload) and not policy.prefetch and each.prefetch:
            continue  # the device budget already ruled out prefetching
        if weights is None or each.peak(models) <= weights:
            return each
    return DiskOffload(leaf=True)


def _check_cpu_budget(sizes: Mapping[str, ModelSize], cpu_budget: ByteSize, policy: AbstractOffload | None) -> None:
    models = list(sizes.values())
    if not models:
        return
    # the least any placement keeps in CPU memory is disk offload's: one model loading at a time
    name, least = max(sizes.items(), key=lambda item: item[1].loading_peak)
    if least.loading_peak > cpu_budget:
        minimum = ByteSize(least.loading_peak)
        if least.loading is None:
            what = f"the largest model ({name})" if least.total == max(size.total for size in models) else name
            why, fix = _WHY_READ.format(what=what), _OR_QUANTIZE.format(name=name)
        else:
            why, fix = _WHY_MAPPED.format(name=name), ""
        raise MemoryBudgetError(_MSG_CPU_BELOW.format(cpu_budget=cpu_budget, minimum=minimum, why=why) + fix)
    if policy is not None and host_peak(policy, models) > cpu_budget:
        raise MemoryBudgetError(
            f"offload={policy!r} keeps {ByteSize(host_peak(policy, models))} of weights in CPU memory, over "
            f"cpu_memory_budget {cpu_budget}: give offload=DiskOffload(...) (its home is a memory-mapped file), or no "
            "offload= and let the planner choose, or raise cpu_memory_budget"
        )


def _kept(sizes: Mapping[str, ModelSize], spare: int) -> dict[str, int]:
    """The spare budget handed to the models' repeated blocks, largest model first (a model's whole blocks at most)."""
    kept: dict[str, int] = {}
    for name, size in sorted(sizes.items(), key=lambda item: -item[1].total):
        blocks = sum(sum(each) for each in size.blocks)
        if spare <= 0:
            break
        if blocks:
            kept[name] = min(spare, blocks)
            spare -= kept[name]
    return kept
