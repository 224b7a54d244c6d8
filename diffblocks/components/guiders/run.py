"""Run a guider's passes through the denoiser and combine them: the body of a guided denoise step."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from diffblocks.components.denoisers import Conditioning, Predict, check_joinable
from diffblocks.components.guiders.base import AbstractGuider, GuiderState
from diffblocks.components.memory.oom import Reliefs, offer_relief, run_relieved


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
        self.sequential_after_oom = False  # set by run_sequentially(): the relief ladder decided so

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

    def run_sequentially(self) -> None:
        """Run the passes one by one for the rest of the call, and free the concatenated conditions.

        The relief this offers after an out-of-memory error (:mod:`diffblocks.components.memory.oom`
        decides when to take it).
        """
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

    The unperturbed passes run first (:func:`plain_predictions`: one batched forward by default),
    then each perturbed pass on its own, with its perturbation applied to ``model`` for that
    forward and in this thread or task only. Threads may share ``model``: none sees another's
    perturbation, and a forward made outside this function is never perturbed.

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
                predictions.append(predict(latents, conditions[guidance_pass.condition]))
    return guider.combine(predictions, state=state, step_index=step_index, num_steps=num_steps)


def plain_predictions(
    predict: Predict,
    latents: Tensor,
    conditions: Mapping[str, Conditioning],
    names: Sequence[str],
    *,
    batched: bool,
) -> list[Tensor]:
    """Unperturbed predictions for the conditions ``names``, in that order.

    With ``batched`` and two or more names they run as one forward: latents and each condition
    tensor are concatenated along the batch and the output split back. Batching is a speed choice,
    not a requirement: a :class:`GuidanceConditions` offers running the passes one by one for the
    rest of the call (:meth:`GuidanceConditions.run_sequentially`) as the first, cheapest relief
    of :mod:`diffblocks.components.memory.oom`, which decides, in a pipeline, when to take it and
    what comes after (the manager's tighter placements). Used on their own (no pipeline step
    around them), or with a plain mapping, the passes fall back to one by one through the same
    ladder, with that one rung.
    """
    sticky = isinstance(conditions, GuidanceConditions)
    if not batched or len(names) < 2 or (sticky and conditions.sequential_after_oom):
        return _one_by_one(predict, latents, conditions, names)
    if sticky and offer_relief(conditions, conditions.run_sequentially):
        return _together(predict, latents, conditions, names)  # out of memory: the step's ladder splits the batch, runs the step again
    split: list[bool] = []
    reliefs = Reliefs()
    reliefs.offer(conditions, conditions.run_sequentially if sticky else lambda: split.append(True))

    def passes() -> list[Tensor]:
        if split or (sticky and conditions.sequential_after_oom):
            return _one_by_one(predict, latents, conditions, names)
        return _together(predict, latents, conditions, names)

    return run_relieved(passes, reliefs, where="guidance passes")


def _together(predict: Predict, latents: Tensor, conditions: Mapping[str, Conditioning], names: Sequence[str]) -> list[Tensor]:
    return list(_batched(predict, latents, conditions, tuple(names)).chunk(len(names)))


def _one_by_one(predict: Predict, latents: Tensor, conditions: Mapping[str, Conditioning], names: Sequence[str]) -> list[Tensor]:
    return [predict(latents, conditions[name]) for name in names]


def _batched(predict: Predict, latents: Tensor, conditions: Mapping[str, Conditioning], names: tuple[str, ...]) -> Tensor:
    """One forward of the passes ``names`` concatenated along the batch."""
    inputs = conditions.batched(names) if isinstance(conditions, GuidanceConditions) else _concatenate(conditions, names)
    return predict(torch.cat([latents] * len(names)), inputs)


__all__ = ["GuidanceConditions", "Predict", "guided_prediction", "plain_predictions"]
