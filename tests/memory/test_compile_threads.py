"""Offload with a compiled denoiser, and concurrent calls sharing offloaded models: the images do not change."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.components import ComponentsManager
from diffblocks.components.memory import AbstractOffload, GroupOffload, ModelOffload
from diffblocks.presets.tiny.preset import builtin_model_dir

INPUTS: dict[str, Any] = dict(prompt="a small green cross in the center", num_inference_steps=2, progress=False)


def _image(pipe: Pipeline, seed: int = 0) -> np.ndarray:
    return np.asarray(pipe(**INPUTS, generator=torch.Generator().manual_seed(seed)).images[0])


@pytest.fixture(scope="module")
def plain() -> Pipeline:
    return Pipeline.from_pretrained(builtin_model_dir())


@pytest.mark.parametrize(("policy", "regional"), [(ModelOffload(), True), (GroupOffload(1), False)], ids=["model-regional", "group-whole"])
def test_a_compiled_denoiser_under_offload_makes_the_same_image(policy: AbstractOffload, regional: bool, plain: Pipeline) -> None:
    torch._dynamo.reset()
    pipe = Pipeline.from_pretrained(builtin_model_dir(), manager=ComponentsManager(device="cpu", offload=policy))
    pipe.compile(regional=regional, backend="aot_eager")  # dynamo traces the model with the policy's hooks; no C++ build
    for _ in range(2):  # the second call prefetches under group offload: the graphs must not depend on where weights wait
        assert np.array_equal(_image(pipe), _image(plain))


@pytest.mark.parametrize("policy", [ModelOffload(), GroupOffload(1)], ids=["model", "group"])
def test_two_threads_sharing_offloaded_models_make_the_images_of_one(policy: AbstractOffload, plain: Pipeline) -> None:
    pipe = Pipeline.from_pretrained(builtin_model_dir(), manager=ComponentsManager(device="cpu", offload=policy))
    expected = {seed: _image(plain, seed) for seed in (1, 2)}
    got: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def call(seed: int) -> None:
        try:
            got[seed] = _image(pipe, seed)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=call, args=(seed,)) for seed in expected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and not any(thread.is_alive() for thread in threads)
    assert all(np.array_equal(got[seed], expected[seed]) for seed in expected)
