"""Run a guider's passes through the denoiser and combine them: the body of a guided denoise step."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from diffblocks.components.guiders.base import AbstractGuider, GuidancePass, GuiderState

Predict = Callable[..., Tensor]
"""``predict(latents, **condition_tensors) -> prediction``: the denoiser at the current step."""


class GuidanceConditions(Mapping[str, Mapping[str, Tensor]]):
    """Condition tensors per condition name that remember their batch concatenations.

    A plain mapping works with :func:`guided_prediction` too, but then the conditions are
    concatenated again at every step; wrap them once before the loop to concatenate them once.

    Args:
        conditions: ``{"cond": {"encoder_hidden_states": ..., ...}, "uncond": {...}}``; every tensor
            has the batch as its first dim, and all conditions have the same keys.
    """

    def __init__(self, conditions: Mapping[str, Mapping[str, Tensor]]) -> None:
        keys = {name: set(tensors) for name, tensors in conditions.items()}
        if len({frozenset(k) for k in keys.values()}) > 1:
            raise ValueError(f"All conditions need the same tensor names, got {keys}.")
        self._conditions = {name: dict(tensors) for name, tensors in conditions.items()}
        self._batched: dict[tuple[str, ...], dict[str, Tensor]] = {}
        self.sequential_after_oom = False

    def __getitem__(self, name: str) -> Mapping[str, Tensor]:
        return self._conditions[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._conditions)

    def __len__(self) -> int:
        return len(self._conditions)

    def batched(self, names: tuple[str, ...]) -> dict[str, Tensor]:
        """The tensors of ``names`` concatenated along the batch, in that order (computed once)."""
        found = self._batched.get(names)
        if found is None:
            found = self._batched[names] = _concatenate(self._conditions, names)
        return found


def _concatenate(conditions: Mapping[str, Mapping[str, Tensor]], names: tuple[str, ...]) -> dict[str, Tensor]:
    return {key: torch.cat([conditions[name][key] for name in names]) for key in conditions[names[0]]}


def guided_prediction(
    guider: AbstractGuider,
    *,
    state: GuiderState | None,
    predict: Predict,
    latents: Tensor,
    conditions: Mapping[str, Mapping[str, Tensor]],
    step_index: int,
    num_steps: int,
    model: nn.Module,
    batched: bool = True,
) -> Tensor:
    """Make the predictions ``guider`` asks for at this step and return their guided combination.

    With ``batched=True`` every unperturbed pass runs in one forward: latents and each condition
    tensor are concatenated along the batch and the output split back. Each perturbed pass runs on
    its own with its perturbation injected into ``model`` and always ejected afterwards.
    ``batched=False`` runs one forward per pass (less memory).

    Args:
        guider: the guidance rule.
        state: ``guider.new_state()``, made once per generation call.
        predict: the denoiser call; inputs shared by all passes (timestep, positional ids) are bound
            inside it, and it must accept the batch sizes it is given.
        latents: ``(batch, ...)`` model input at this step.
        conditions: condition tensors for ``"cond"`` and ``"uncond"`` (a :class:`GuidanceConditions`
            concatenates them once for all steps).
        step_index: index of this step, from 0.
        num_steps: number of denoising steps.
        model: the module perturbations hook into (the one ``predict`` runs).
        batched: run the unperturbed passes in one forward.
    """
    passes = guider.passes(step_index, num_steps)
    predictions: list[Any] = [None] * len(passes)
    plain = [i for i, p in enumerate(passes) if p.perturbation is None]
    sticky = isinstance(conditions, GuidanceConditions)
    if batched and len(plain) > 1 and not (sticky and conditions.sequential_after_oom):
        names = tuple(passes[i].condition for i in plain)
        inputs = conditions.batched(names) if sticky else _concatenate(conditions, names)
        try:
            output = predict(torch.cat([latents] * len(plain)), **inputs)
        except torch.OutOfMemoryError:
            # batched guidance is a speed choice, not a requirement: out of memory, run the passes
            # one by one, for the rest of the call when the conditions can remember it
            if sticky:
                conditions.sequential_after_oom = True
            torch.cuda.empty_cache()
            output = torch.cat([predict(latents, **conditions[passes[i].condition]) for i in plain])
        for i, chunk in zip(plain, output.chunk(len(plain))):
            predictions[i] = chunk
    else:
        for i in plain:
            predictions[i] = predict(latents, **conditions[passes[i].condition])
    for i, guidance_pass in enumerate(passes):
        if guidance_pass.perturbation is not None:
            predictions[i] = _perturbed(guidance_pass, predict, latents, conditions, model)
    return guider.combine(predictions, state=state, step_index=step_index, num_steps=num_steps)


def _perturbed(
    guidance_pass: GuidancePass,
    predict: Predict,
    latents: Tensor,
    conditions: Mapping[str, Mapping[str, Tensor]],
    model: nn.Module,
) -> Tensor:
    perturbation = guidance_pass.perturbation
    assert perturbation is not None
    perturbation.inject(model)
    try:
        return predict(latents, **conditions[guidance_pass.condition])
    finally:
        perturbation.eject(model)


__all__ = ["GuidanceConditions", "Predict", "guided_prediction"]
