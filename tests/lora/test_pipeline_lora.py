"""The diffusers-style LoRA methods of a pipeline: the same LoRA files give diffusers' images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffblocks.blocks import Pipeline
from tests.lora.lora_files import kohya_from_peft, peft_lora
from tests.presets.sd_fixtures import tiny_sd15

KWARGS = dict(prompt="a red circle", negative_prompt="blurry", height=32, width=32, num_inference_steps=3, guidance_scale=6.0)


@pytest.fixture(scope="module")
def sd15_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd15(tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="module")
def lora_files(sd15_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd15_repo / "unet")
    folder = tmp_path_factory.mktemp("loras")
    a, b = peft_lora(unet, folder / "a", seed=1), peft_lora(unet, folder / "b", seed=2)
    return {"a": a, "b": b, "b_kohya": kohya_from_peft(b, folder / "b_kohya.safetensors", alpha=1.0)}


def _images(pipe, *, ours: bool) -> np.ndarray:  # type: ignore[no-untyped-def]
    extra = {"progress": False} if ours else {}
    return pipe(**KWARGS, generator=torch.Generator().manual_seed(7), output_type="np", **extra).images


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # peft's note on a second adapter
def test_load_set_fuse_unfuse_unload_match_diffusers(sd15_repo: Path, lora_files: dict[str, Path]) -> None:
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd15_repo, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(str(sd15_repo))
    unet = ours.components["unet"]
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    plain = _images(ours, ours=True)

    ref.load_lora_weights(lora_files["a"].parent, adapter_name="a")
    assert ours.load_lora_weights(lora_files["a"].parent, adapter_name="a") == "a"
    one = _images(ref, ours=False)
    assert np.abs(one - plain).max() > 1e-3
    assert np.abs(_images(ours, ours=True) - one).max() < 1e-5

    # the newest adapter is the active one, as in diffusers; a kohya file of b reads as b
    ref.load_lora_weights(lora_files["b"].parent, adapter_name="b")
    assert ours.load_lora_weights(lora_files["b_kohya"]) == "default_0"
    assert ours.get_active_adapters() == ["default_0"]
    ref.set_adapters(["a", "b"], [0.7, 0.4])
    ours.set_adapters(["a", "default_0"], [0.7, 0.4])
    two = _images(ref, ours=False)
    assert np.abs(_images(ours, ours=True) - two).max() < 1e-5

    ref.fuse_lora()
    ours.fuse_lora()
    assert np.abs(_images(ours, ours=True) - _images(ref, ours=False)).max() < 1e-4
    ours.unfuse_lora()
    ours.unload_lora_weights()
    assert np.array_equal(_images(ours, ours=True), plain)
    assert all(torch.equal(v, original[k]) for k, v in ours.components["unet"].state_dict().items())
