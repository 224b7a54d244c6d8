"""Requests that can share one pipeline call, and that call.

Requests that differ only in their prompt and seed run as one batch: the prompts as a list, one
generator per image in request order. Each image keeps its own generator, so its starting noise is
bit for bit the noise it gets alone; the denoised image can still differ in the last bit of a float
(batched kernels add in another order), which on the CPU has moved a pixel by one level of 255 at most.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from diffblocks.blocks import InputError
from diffblocks.scale.request import MAX_IMAGES_PER_REQUEST, GenerationRequest, RequestRunner

if TYPE_CHECKING:
    from PIL.Image import Image

_OWN = frozenset({"prompt", "seed"})  # what each request of a shared call keeps to itself

REFUSED = (ValidationError, InputError, ValueError)
"""What a request is refused for, alone: its fields, its pipeline inputs, settings the model cannot take."""


@dataclass(frozen=True)
class Outcome:
    """One request's share of a batch: its images, or the error that stopped it."""

    images: list[Image] | None = None
    error: Exception | None = None
    together: int = 1  # requests in the pipeline call that made the images


def batch_key(request: GenerationRequest) -> tuple[tuple[str, Any], ...]:
    """What requests must share to run in one call: every setting but the prompt and the seed."""
    return tuple((name, value) for name, value in request.model_dump().items() if name not in _OWN)


def groups(requests: Sequence[GenerationRequest], *, max_images: int = MAX_IMAGES_PER_REQUEST) -> list[list[int]]:
    """Indices of ``requests`` that can share a call, in arrival order; groups in order of their first request.

    Requests share a call when they share :func:`batch_key`, up to ``max_images`` images in all (one
    request's own images are never split), so a batch of large requests does not become one huge call.
    """
    open_groups: dict[tuple[tuple[str, Any], ...], list[int]] = {}
    done: list[list[int]] = []
    for index, request in enumerate(requests):
        key = batch_key(request)
        group = open_groups.get(key)
        if group is not None and (len(group) + 1) * request.num_images > max_images:
            done.append(group)  # full: later requests like it start a new call
            group = None
        if group is None:
            group = open_groups[key] = []
        group.append(index)
    done += open_groups.values()
    return sorted(done, key=lambda group: group[0])


def images_together(runner: RequestRunner, requests: Sequence[GenerationRequest]) -> list[list[Image]]:
    """The images of each request, made in one pipeline call; the requests must share :func:`batch_key`.

    Example:
        >>> runner = RequestRunner.load(device="cpu")
        >>> a, b = (GenerationRequest(prompt=p, seed=s, height=32, width=32, num_inference_steps=2)
        ...         for p, s in (("a red circle", 1), ("a blue square", 2)))
        >>> [len(images) for images in images_together(runner, [a, b])]
        [1, 1]
    """
    if not requests:
        return []
    first = requests[0]
    for request in requests[1:]:
        if batch_key(request) != batch_key(first):
            differ = [name for (name, mine), (_, theirs) in zip(batch_key(first), batch_key(request)) if mine != theirs]
            raise ValueError(f"requests differ in {', '.join(differ)}, so they cannot share a call; run them apart (groups())")
    out = runner.run(
        first,
        prompt=[request.prompt for request in requests],
        generator=[generator for request in requests for generator in request.generators()],
    )
    latents = out.get("latents")
    if isinstance(latents, torch.Tensor) and not bool(torch.isfinite(latents).all()):
        raise ValueError(
            "the run produced NaN or infinite latents, so every image would be black. "
            "Try a lower guidance scale, float32 weights, or another scheduler"
        )
    images = list(out.images)
    per = first.num_images
    return [images[k * per : (k + 1) * per] for k in range(len(requests))]


def run_batch(runner: RequestRunner, requests: Sequence[GenerationRequest], *, max_images: int = MAX_IMAGES_PER_REQUEST) -> list[Outcome]:
    """Each request's outcome, the requests run in as few calls as :func:`groups` allows.

    A request refused when its call runs (:data:`REFUSED`) fails alone: its group runs again one
    request at a time. Any other error fails the requests of its call, not the rest of the batch.
    """
    outcomes = [Outcome()] * len(requests)
    for group in groups(requests, max_images=max_images):
        for index, outcome in zip(group, _run_group(runner, [requests[k] for k in group])):
            outcomes[index] = outcome
    return outcomes


def _run_group(runner: RequestRunner, requests: list[GenerationRequest]) -> list[Outcome]:
    try:
        made = images_together(runner, requests)
    except REFUSED as error:
        if len(requests) == 1:
            return [Outcome(error=error)]
        return [_run_group(runner, [request])[0] for request in requests]
    except Exception as error:  # noqa: BLE001 - the callers of this call get it, the batch goes on
        return [Outcome(error=error)] * len(requests)
    return [Outcome(images=images, together=len(requests)) for images in made]
