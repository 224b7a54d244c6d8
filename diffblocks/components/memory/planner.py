"""The planner: the cheapest offload policy whose peak fits the budget, and why."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import final

from diffblocks.components.memory.measure import ModelSize
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
    """

    device: str
    budget: ByteSize | None
    policy: AbstractOffload
    peak: ByteSize
    sizes: Mapping[str, ModelSize]
    tried: tuple[tuple[AbstractOffload, ByteSize], ...]
    kept: Mapping[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        total = ByteSize(sum(size.total for size in self.sizes.values()))
        budget = f"budget {self.budget}" if self.budget is not None else "no budget"
        lines = [f"{len(self.sizes)} model(s), {total} of weights, on {self.device} ({budget})"]
        lines += [f"  {name:<16} {ByteSize(size.total)!s:>10}" for name, size in sorted(self.sizes.items())]
        for policy, peak in self.tried:
            mark = "->" if policy == self.policy else "  "
            verdict = "fits" if self.budget is None or peak <= self.budget else "does not fit"
            lines.append(f"{mark} {policy!r}: {peak} at most on {self.device}, {verdict}")
        lines.append(f"chosen: {self.policy!r}: {self.policy.describe()}")
        lines += [f"  and {ByteSize(kept)} of {name}'s repeated blocks stay on the device, in the spare budget"
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
) -> MemoryPlan:
    """The first policy of ``ladder`` (or the given ``policy``) whose peak fits ``budget``.

    Each model counts once however many pipelines use it: ``sizes`` is keyed by component. With
    ``keep``, a group-offload plan spends the budget it leaves spare on keeping repeated blocks on
    the device, so fewer are streamed each step: the largest model's first (the denoiser, which
    runs every step, in every family we ship but the tiny one), then the next. ``activations``
    bytes of the budget are left to activations: weights get the rest.

    Raises:
        MemoryBudgetError: nothing fits; the message says the least any policy needs.

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
    tried = tuple((each, ByteSize(each.peak(models))) for each in ((policy,) if policy is not None else ladder))
    weights = ByteSize(max(budget - activations, 0)) if budget is not None else None
    for each, peak in tried:
        if weights is None or peak <= weights:
            kept = _kept(sizes, weights - peak) if keep and weights is not None and isinstance(each, GroupOffload) else {}
            return MemoryPlan(device, budget, each, ByteSize(peak + sum(kept.values())), dict(sizes), tried, kept)
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
