"""Run a guider's passes through the denoiser and combine them: the body of a guided denoise step."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from diffblocks.components.denoisers import Conditioning, Predict, check_joinable
from diffblocks.components.guiders.base import AbstractGuider, GuidancePass, GuiderState
from diffblocks.components.guiders.locking import ModelLock, model_lock


class GuidanceConditions(Mapping[str, Conditioning]):
    """The conditioning per condition name, which remembers its batch concatenations.

    A plain mapping works with :func:`guided_prediction` too, but then the conditionings are
    concatenated again at every step; wrap them once before the loop to concatenate them once.

    Args:
        conditions: ``{"cond": Conditioning(...), "uncond": Conditioning(...)}``; they must be
            joinable (:meth:`Conditioning.cat`): the same fields set, equal shapes past the batch.

    Raises:
        ValueError: naming the field that keeps the conditionings from being concatenated.
    """

    def __init__(self, conditions: Mapping[str, Conditioning]) -> None:
        self._conditions = dict(conditions)
        if self._conditions:
            check_joinable(list(self._conditions.values()))
        self._batched: dict[tuple[str, ...], Conditioning] = {}
        self.sequential_after_oom = False

    def __getitem__(self, name: str) -> Conditioning:
        return self._conditions[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._conditions)

    def __len__(self) -> int:
        return len(self._conditions)

    def batched(self, names: tuple[str, ...]) -> Conditioning:
        """The conditionings of ``names`` concatenated along the batch, in that order (computed once)."""
        found = self._batched.get(names)
        if found is None:
            found = self._batched[names] = _concatenate(self._conditions, names)
        return found

    def fall_back_to_sequential(self) -> None:
        """Run the passes one by one for the rest of the call, and free the concatenated conditions."""
        self.sequential_after_oom = True
        self._batched.clear()


def _concatenate(conditions: Mapping[str, Conditioning], names: tuple[str, ...]) -> Conditioning:
    return Conditioning.cat([conditions[name] for name in names])


def guided_prediction(
    guider: AbstractGuider,
    *,
    state: GuiderState | None,
    predict: Predict,
    latents: Tensor,
    conditions: Mapping[str, Conditioning],
    step_index: int,
    num_steps: int,
    model: nn.Module,
    batched: bool = True,
) -> Tensor:
    """Make the predictions ``guider`` asks for at this step and return their guided combination.

    With ``batched=True`` every unperturbed pass runs in one forward: latents and each condition
    tensor are concatenated along the batch and the output split back; if that forward runs out of
    memory, the passes run one by one (for the rest of the call with :class:`GuidanceConditions`).
    Each perturbed pass runs on its own with its perturbation injected into ``model`` and always
    ejected afterwards. ``batched=False`` runs one forward per pass (less memory).

    Threads may share ``model``: a perturbed pass holds the model's lock alone (no other forward
    made through this function runs meanwhile), plain passes share it. Forwards of ``model`` made
    outside this function are not held back and would see an injected perturbation.

    Args:
        guider: the guidance rule.
        state: ``guider.new_state()``, made once per generation call.
        predict: ``predict(x, conditioning)``, the denoiser at this step with its timestep bound
            (``denoiser.at(t)``); it must accept the batch sizes it is given.
        latents: ``(batch, ...)`` model input at this step.
        conditions: the :class:`Conditioning` of ``"cond"`` and ``"uncond"`` (a :class:`GuidanceConditions`
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
    lock = model_lock(model)
    if batched and len(plain) > 1 and not (sticky and conditions.sequential_after_oom):
        names = tuple(passes[i].condition for i in plain)
        output = _batched(predict, latents, conditions, names, lock)
        if output is None:
            # batched guidance is a speed choice, not a requirement: out of memory, run the passes
            # one by one, for the rest of the call when the conditions can remember it
            if sticky:
                conditions.fall_back_to_sequential()
            torch.cuda.empty_cache()
            lock.acquire_plain()
            try:
                output = torch.cat([predict(latents, conditions[passes[i].condition]) for i in plain])
            finally:
                lock.release_plain()
        for i, chunk in zip(plain, output.chunk(len(plain))):
            predictions[i] = chunk
    elif plain:
        lock.acquire_plain()
        try:
            for i in plain:
                predictions[i] = predict(latents, conditions[passes[i].condition])
        finally:
            lock.release_plain()
    for i, guidance_pass in enumerate(passes):
        if guidance_pass.perturbation is not None:
            predictions[i] = _perturbed(guidance_pass, predict, latents, conditions, model, lock)
    return guider.combine(predictions, state=state, step_index=step_index, num_steps=num_steps)


def _batched(
    predict: Predict,
    latents: Tensor,
    conditions: Mapping[str, Conditioning],
    names: tuple[str, ...],
    lock: ModelLock,
) -> Tensor | None:
    """One forward of the passes ``names`` concatenated along the batch, or None when it ran out of memory.

    The retry belongs to the caller, after this returns: inside the ``except`` block the traceback
    would keep the failed forward's activations alive during the retry.
    """
    inputs = conditions.batched(names) if isinstance(conditions, GuidanceConditions) else _concatenate(conditions, names)
    lock.acquire_plain()
    try:
        return predict(torch.cat([latents] * len(names)), inputs)
    except torch.OutOfMemoryError:
        return None
    finally:
        lock.release_plain()


def _perturbed(
    guidance_pass: GuidancePass,
    predict: Predict,
    latents: Tensor,
    conditions: Mapping[str, Conditioning],
    model: nn.Module,
    lock: ModelLock,
) -> Tensor:
    perturbation = guidance_pass.perturbation
    assert perturbation is not None
    lock.acquire_perturbed()
    try:
        perturbation.inject(model)
        try:
            return predict(latents, conditions[guidance_pass.condition])
        finally:
            perturbation.eject(model)
    finally:
        lock.release_perturbed()


__all__ = ["GuidanceConditions", "Predict", "guided_prediction"]
