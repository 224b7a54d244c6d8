"""Requests that share their settings run as one call, each image seeded as it is alone; checks before runs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL.Image import Image

from diffblocks.blocks import InputError
from diffblocks.scale import GenerationRequest, RequestRunner
from diffblocks.scale.together import batch_key, groups, images_together, run_batch

SMALL = {"height": 32, "width": 32, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def runner() -> RequestRunner:
    return RequestRunner.load(device="cpu")


def request(prompt: str = "a red circle", **fields: object) -> GenerationRequest:
    return GenerationRequest.model_validate({"prompt": prompt, **SMALL, **fields})


def pixels(image: Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def test_groups_by_everything_but_prompt_and_seed() -> None:
    requests = [
        request("a red circle", seed=1),
        request("a blue square", seed=2, num_inference_steps=3),
        request("a green triangle", seed=3),
        request("a red circle", seed=4, negative_prompt="blurry"),
        request("a blue square", seed=5, num_inference_steps=3),
    ]
    assert groups(requests) == [[0, 2], [1, 4], [3]]
    assert batch_key(requests[0]) == batch_key(requests[2]) != batch_key(requests[3])
    assert groups([]) == []
    # at most max_images images per call; a request's own images stay together
    big = [request(seed=k, num_images=3) for k in range(5)]
    assert groups(big, max_images=6) == [[0, 1], [2, 3], [4]]
    assert groups(big, max_images=2) == [[0], [1], [2], [3], [4]]


def test_each_image_as_it_is_alone(runner: RequestRunner) -> None:
    requests = [request("a red circle", seed=1, num_images=2), request("a blue square", seed=7, num_images=2)]
    together = images_together(runner, requests)
    assert [len(images) for images in together] == [2, 2]
    for one, images in zip(requests, together):
        for alone, batched in zip(runner.images(one), images):
            # the same noise from the same generator; batched CPU kernels may round a float's last bit
            # the other way, which moves a pixel by at most one level of 255
            assert np.abs(pixels(alone) - pixels(batched)).max() <= 1
    assert np.abs(pixels(together[0][0]) - pixels(together[1][0])).max() > 10  # the prompts and seeds matter
    assert images_together(runner, []) == []


def test_requests_that_differ_are_refused_together(runner: RequestRunner) -> None:
    with pytest.raises(ValueError, match="requests differ in num_inference_steps, guidance_scale, so they cannot share a call"):
        images_together(runner, [request(), request(num_inference_steps=3, guidance_scale=2.0)])


def test_check_refuses_before_any_run(runner: RequestRunner) -> None:
    with pytest.raises(InputError, match=r"height 30 is not a positive multiple of 4 \(the VAE factor\); use 28 or 32"):
        runner.check(request(height=30))
    with pytest.raises(ValueError, match="EulerDiscreteScheduler cannot sample this model: it was trained for flow matching"):
        runner.check(request(scheduler="EulerDiscreteScheduler"))
    runner.check(request(guider="AdaptiveProjectedGuidance"))  # a good one passes, and the guider stays
    assert type(runner.pipe.components["guider"]).__name__ == "ClassifierFreeGuidance"


def test_a_request_refused_at_run_time_fails_alone(runner: RequestRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = runner.run

    def refusing(request: GenerationRequest, **extra: Any) -> Any:
        # a value only known at run time, as a block's FieldError would be
        prompts = extra.get("prompt", [request.prompt])
        if "a bad circle" in prompts:
            raise InputError([], context="the bad one")
        if "a broken square" in prompts:
            raise RuntimeError("out of memory")
        return real_run(request, **extra)

    monkeypatch.setattr(runner, "run", refusing)
    requests = [request("a red circle"), request("a bad circle"), request("a blue square"), request("a broken square", num_images=2)]
    outcomes = run_batch(runner, requests)
    assert [outcome.error is None for outcome in outcomes] == [True, False, True, False]
    assert isinstance(outcomes[1].error, InputError) and isinstance(outcomes[3].error, RuntimeError)
    assert [outcome.together for outcome in outcomes] == [1, 1, 1, 1]  # the first group ran again one by one
    assert [len(outcome.images or []) for outcome in outcomes] == [1, 0, 1, 0]
    assert [outcome.together for outcome in run_batch(runner, requests[::2])] == [2, 2]
