"""Run a guider's passes through the denoiser and combine them: the body of a guided denoise step."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from diffblocks.components.guiders.base import AbstractGuider, GuiderState

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

    def fall_back_to_sequential(self) -> None:
        """Run the passes one by one for the rest of the call, and free the concatenated conditions."""
        self.sequential_after_oom = True
        self._batched.clear()


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

    The unperturbed passes run first (:func:`plain_predictions`: one batched forward by default),
    then each perturbed pass on its own, with its perturbation applied to ``model`` for that
    forward and in this thread or task only. Threads may share ``model``: none sees another's
    perturbation, and a forward made outside this function is never perturbed.

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
        model: the module ``predict`` runs, which perturbed passes perturb.
        batched: run the unperturbed passes in one forward.
    """
    passes = guider.passes(step_index, num_steps)
    names = [p.condition for p in passes if p.perturbation is None]
    plain = iter(plain_predictions(predict, latents, conditions, names, batched=batched))
    predictions: list[Tensor] = []
    for guidance_pass in passes:
        if guidance_pass.perturbation is None:
            predictions.append(next(plain))
        else:
            with guidance_pass.perturbation.applied(model):
                predictions.append(predict(latents, **conditions[guidance_pass.condition]))
    return guider.combine(predictions, state=state, step_index=step_index, num_steps=num_steps)


def plain_predictions(
    predict: Predict,
    latents: Tensor,
    conditions: Mapping[str, Mapping[str, Tensor]],
    names: Sequence[str],
    *,
    batched: bool,
) -> list[Tensor]:
    """Unperturbed predictions for the conditions ``names``, in that order.

    With ``batched`` and two or more names they run as one forward: latents and each condition
    tensor are concatenated along the batch and the output split back. If that forward runs out
    of memory they run one by one, for the rest of the call with :class:`GuidanceConditions`
    (which then frees its concatenated conditions): batching is a speed choice, not a requirement.
    """
    sticky = isinstance(conditions, GuidanceConditions)
    if batched and len(names) > 1 and not (sticky and conditions.sequential_after_oom):
        output = _batched(predict, latents, conditions, tuple(names))
        if output is not None:
            return list(output.chunk(len(names)))
        if sticky:
            conditions.fall_back_to_sequential()
        torch.cuda.empty_cache()
    return [predict(latents, **conditions[name]) for name in names]


def _batched(
    predict: Predict, latents: Tensor, conditions: Mapping[str, Mapping[str, Tensor]], names: tuple[str, ...]
) -> Tensor | None:
    """One forward of the passes ``names`` concatenated along the batch, or None when it ran out of memory.

    The retry belongs to the caller, after this returns: inside the ``except`` block the traceback
    would keep the failed forward's activations alive during the retry.
    """
    inputs = conditions.batched(names) if isinstance(conditions, GuidanceConditions) else _concatenate(conditions, names)
    try:
        return predict(torch.cat([latents] * len(names)), **inputs)
    except torch.OutOfMemoryError:
        return None


__all__ = ["GuidanceConditions", "Predict", "guided_prediction", "plain_predictions"]
