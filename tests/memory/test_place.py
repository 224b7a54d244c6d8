"""manager.place(): a budget or a policy given after the models loaded, swapped, or taken off again."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.components import ComponentsManager
from diffblocks.components.memory import GroupOffload, MemoryBudgetError, ModelOffload, NoOffload
from diffblocks.presets.tiny.preset import builtin_model_dir

KWARGS = {"prompt": "a small green cross in the center", "num_inference_steps": 2, "progress": False}


def _image(pipe: Pipeline) -> np.ndarray:
    return np.asarray(pipe(generator=torch.Generator().manual_seed(0), **KWARGS).images[0])


def _hooked(pipe: Pipeline) -> dict[str, bool]:
    return {name: bool(pipe.components[name]._forward_pre_hooks) for name in ("text_encoder", "unet", "vae")}


@pytest.fixture
def loaded() -> tuple[Pipeline, list[str], np.ndarray]:
    """A pipeline whose models were loaded and ran with no budget: every model simply on the device."""
    moved: list[str] = []
    pipe = Pipeline.from_pretrained(builtin_model_dir(), manager=ComponentsManager(
        device="cpu", on_move=lambda name, device, size: moved.append(name)))
    return pipe, moved, _image(pipe)


def test_a_budget_given_after_loading_places_the_loaded_models_and_the_image_stays(loaded: tuple[Pipeline, list[str], np.ndarray]) -> None:
    pipe, moved, plain = loaded
    assert not moved and not any(_hooked(pipe).values())
    assert pipe.manager.place(memory_budget="80MiB") is pipe.manager
    assert pipe.manager.plan().policy == GroupOffload(1)
    assert all(_hooked(pipe).values())  # placed at once, not at the next call
    moved.clear()
    assert np.array_equal(_image(pipe), plain)
    assert any(name.startswith("unet/") for name in moved)  # the UNet's blocks streamed, told to the same on_move


def test_policies_swap_and_come_off_again(loaded: tuple[Pipeline, list[str], np.ndarray]) -> None:
    pipe, moved, plain = loaded
    pipe.manager.place(offload=ModelOffload())
    assert np.array_equal(_image(pipe), plain)
    assert moved == ["text_encoder", "text_encoder", "unet", "unet", "vae"]  # in, home when the next comes in
    moved.clear()
    pipe.manager.place(offload=GroupOffload(2))
    models = ["text_encoder", "unet", "vae"]
    # one model at a time, placed at once: home from ModelOffload, then GroupOffload's resident part in
    assert moved[:6] == [move for name in models for move in (name, f"{name}/(outside blocks)")]
    assert np.array_equal(_image(pipe), plain)
    params = {name: [id(p) for p in pipe.components[name].parameters()] for name in models}
    pipe.manager.place()  # neither: every model back on the device as it was, no hook left
    assert not any(_hooked(pipe).values())
    assert params == {name: [id(p) for p in pipe.components[name].parameters()] for name in models}
    assert pipe.manager.plan().policy == NoOffload()
    assert np.array_equal(_image(pipe), plain)


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"memory_budget": "1MiB"}, MemoryBudgetError, r"needs at least"),
        ({"memory_budget": "twelve gigs"}, ValueError, r"is not a size"),
        ({"activations": "1GiB"}, ValueError, r"give memory_budget= too"),
        ({"offload": "model"}, TypeError, r"is not an offload policy"),
    ],
)
def test_settings_refused_leave_the_placement_as_it_was(
    loaded: tuple[Pipeline, list[str], np.ndarray], settings: dict[str, object], error: type[Exception], match: str
) -> None:
    pipe, moved, plain = loaded
    pipe.manager.place(offload=ModelOffload())
    before, hooked = pipe.manager.placement, _hooked(pipe)
    moved.clear()
    with pytest.raises(error, match=match):
        pipe.manager.place(**settings)  # type: ignore[arg-type]  # the mistakes under test
    assert pipe.manager.placement is before and _hooked(pipe) == hooked and not moved
    assert pipe.manager.plan().policy == ModelOffload()
    assert np.array_equal(_image(pipe), plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: models taken off a real device and put back")
def test_on_cuda_place_takes_the_models_off_the_device_and_back() -> None:
    pipe = Pipeline.from_pretrained(builtin_model_dir(), manager=ComponentsManager(device="cuda"))
    plain = _image(pipe)
    models = ("text_encoder", "unet", "vae")
    on_device = torch.cuda.memory_allocated()
    assert all(p.device.type == "cuda" for name in models for p in pipe.components[name].parameters())
    pipe.manager.place(offload=ModelOffload())
    assert all(p.device.type == "cpu" for name in models for p in pipe.components[name].parameters())  # home between calls
    assert torch.cuda.memory_allocated() < on_device  # their device copies were freed, not kept beside the homes
    assert np.array_equal(_image(pipe), plain)
    pipe.manager.place(offload=GroupOffload(1))
    assert np.array_equal(_image(pipe), plain)
    pipe.manager.place()
    assert not any(_hooked(pipe).values())
    assert all(p.device.type == "cuda" for name in models for p in pipe.components[name].parameters())
    assert np.array_equal(_image(pipe), plain)
