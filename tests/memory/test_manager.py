"""The ComponentsManager under a budget or a policy: same images, planned before loading, bad input refused early."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.components import ComponentsManager, ComponentSpec
from diffblocks.components.memory import (
    GroupOffload,
    LeafOffload,
    MemoryBudgetError,
    ModelOffload,
    NoOffload,
    measure,
)
from diffblocks.components.memory.estimate import size_before_loading
from diffblocks.components.models.autoencoder_kl import VaeTiling
from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.presets.tiny.preset import builtin_model_dir

MIB = 2**20


def _image(manager: ComponentsManager, tiling: VaeTiling | None = None) -> np.ndarray:
    pipe = Pipeline.from_pretrained(builtin_model_dir(), manager=manager)
    pipe.components["vae"].tiling = tiling
    out = pipe(prompt="a small green cross in the center", num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), progress=False)
    return np.asarray(out.images[0])


@pytest.fixture(scope="module")
def unconstrained() -> np.ndarray:
    return _image(ComponentsManager())


@pytest.mark.parametrize("policy", [NoOffload(), ModelOffload(), GroupOffload(2), LeafOffload()])
def test_images_with_each_policy_equal_the_images_without(policy: object, unconstrained: np.ndarray) -> None:
    moved: list[str] = []
    manager = ComponentsManager(device="cpu", offload=policy, on_move=lambda name, device, size: moved.append(name))  # type: ignore[arg-type]
    assert np.array_equal(_image(manager), unconstrained)
    assert moved and manager.plan().policy == policy


@pytest.mark.parametrize(
    ("budget", "expected", "tile"),  # the built-in model in float32: 86.6 MiB text encoder, 45.2 MiB UNet, 10.3 MiB VAE
    [("1GiB", NoOffload(), None), ("100MiB", ModelOffload(), None), ("80MiB", GroupOffload(1), None),
     ("64MiB", GroupOffload(1, prefetch=False), None),
     ("45MiB", LeafOffload(), 16)],  # 0.3 MiB left to activations: the 5 MiB decode runs in the smallest tiles
)
def test_a_budget_plans_before_loading_and_the_image_stays(
    budget: str, expected: object, tile: int | None, unconstrained: np.ndarray
) -> None:
    manager = ComponentsManager(device="cpu", memory_budget=budget)
    Pipeline.from_pretrained(builtin_model_dir(), manager=manager)
    plan = manager.plan()
    assert plan.policy == expected
    assert not any(row.loaded for row in manager.table())  # measured from headers, nothing read
    image = _image(manager)
    if tile is None:
        assert np.array_equal(image, unconstrained)
    else:  # the image is the one its decode's tiling gives without a budget
        assert np.array_equal(image, _image(ComponentsManager(), VaeTiling(tile_sample_size=tile)))
        assert not np.array_equal(image, unconstrained)


def test_a_budget_below_the_minimum_fails_before_loading_and_says_the_minimum() -> None:
    manager = ComponentsManager(device="cpu", memory_budget="20MiB")
    pipe = Pipeline.from_pretrained(builtin_model_dir(), manager=manager)
    with pytest.raises(MemoryBudgetError, match=r"memory budget 20.0 MiB on cpu .* LeafOffload\(\) needs at least 44.7 MiB"):
        pipe(prompt="a cross", num_inference_steps=1, progress=False)
    assert not any(row.loaded for row in manager.table())


def test_shared_components_count_once() -> None:
    manager = ComponentsManager(device="cpu", memory_budget="1GiB")
    first = Pipeline.from_pretrained(builtin_model_dir(), manager=manager)
    alone = manager.plan()
    Pipeline.from_pretrained(builtin_model_dir(), manager=manager)  # the same specs: the same entries
    Pipeline(first.blocks, first.components, manager=manager, name="objects")  # the same objects, added by identity
    both = manager.plan()
    assert sorted(both.sizes) == ["text_encoder", "unet", "vae"]
    assert abs(both.peak - alone.peak) <= 4096  # loaded now: the text encoder's 4 KiB of position ids count


def test_sizes_before_loading_match_the_loaded_models() -> None:
    pipe = Pipeline.from_pretrained(builtin_model_dir())
    for name in ("unet", "vae", "text_encoder"):
        key = pipe.component_keys()[name]
        cls = pipe.manager.component_type(key)
        spec = pipe.manager.spec(key)
        assert cls is not None and spec is not None
        assert spec.repo is not None
        folder = Path(spec.repo) / (spec.subfolder or "")
        estimate, loaded = size_before_loading(cls, folder=folder, dtype=spec.torch_dtype), measure(pipe.manager.get(key))
        assert estimate is not None
        # a text encoder's non-persistent buffer (position ids, 4 KiB) is not in its file
        assert abs(estimate.total - loaded.total) <= 4096 and estimate.largest_leaf == loaded.largest_leaf
        assert estimate.blocks == loaded.blocks


def test_a_model_from_a_config_is_measured_on_the_meta_device() -> None:
    config = {"sample_size": 8, "block_out_channels": (8, 16), "layers_per_block": 1, "cross_attention_dim": 8,
              "attention_head_dim": 2, "norm_num_groups": 4,
              "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}
    assert size_before_loading(UNet2DConditionModel, config=config) == measure(UNet2DConditionModel.from_config(config))
    # the manager measures a spec built from a config the same way, before building it
    manager = ComponentsManager(device="cpu", memory_budget="1GiB")
    manager.add("unet", ComponentSpec(name="unet", type_hint=("diffusers", "UNet2DConditionModel"), config=config, random_weights=True))
    assert manager.plan().sizes["unet"] == measure(UNet2DConditionModel.from_config(config))
    assert not manager.is_loaded("unet")


def test_the_plan_changes_as_models_are_added_and_models_get_the_new_policy() -> None:
    manager = ComponentsManager(device="cpu", memory_budget=3 * 4096)
    first = manager.add("a", torch.nn.Linear(32, 32))  # 4.1 KiB
    assert manager.plan().policy == NoOffload()
    model = manager.get(first)
    assert not model._forward_pre_hooks
    second = manager.add("b", torch.nn.Linear(32, 64))  # 8.4 KiB: both no longer fit, one at a time does
    assert manager.plan().policy == ModelOffload()
    manager.get(second)  # loaded under the new plan, which places the model already loaded too (a call may be running it)
    assert model._forward_pre_hooks
    assert manager.get(first) is model
    manager.remove("b")
    assert manager.plan().policy == NoOffload() and not manager.get(first)._forward_pre_hooks


@pytest.mark.parametrize("budget", ["twelve gigs", "12 GiBs", "-3MiB"])
def test_an_unparseable_budget_fails_at_construction(budget: str) -> None:
    with pytest.raises(ValueError, match=r"is not a size|negative"):
        ComponentsManager(device="cpu", memory_budget=budget)


@pytest.mark.parametrize("device", ["cuda:7", "tpu", "gpu"])
def test_a_device_that_does_not_exist_is_refused_with_a_budget(device: str) -> None:
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has eight GPUs")
    with pytest.raises(ValueError, match=f"device {device!r}"):
        ComponentsManager(device=device, memory_budget="12GiB")


def test_an_offload_that_is_not_a_policy_is_refused() -> None:
    with pytest.raises(TypeError, match="offload='model' is not an offload policy: give NoOffload"):
        ComponentsManager(device="cpu", offload="model")  # type: ignore[arg-type]  # the mistake under test
