"""SD 1.x inpainting against diffusers' StableDiffusionInpaintPipeline: same seed, same image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from diffblocks.blocks import InputError, Pipeline
from tests.presets.sd_fixtures import tiny_sd15

SIZE = 32


@pytest.fixture(scope="module")
def inpaint_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd15(tmp_path_factory.mktemp("sd15_inpaint"), in_channels=9)


@pytest.fixture(scope="module")
def plain_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd15(tmp_path_factory.mktemp("sd15_plain"), scheduler="EulerAncestralDiscreteScheduler")


def image() -> PIL.Image.Image:
    return PIL.Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype("uint8"))


def mask_array() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=np.float32)
    mask[4:20, 10:30] = 1.0
    return mask


def compare(repo: Path, **kwargs: Any) -> tuple[np.ndarray, np.ndarray, str]:
    import diffusers

    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(repo, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(str(repo))
    common = dict(prompt="a red circle", image=image(), height=SIZE, width=SIZE, num_inference_steps=3, output_type="np")
    common.update(kwargs)
    expected = ref(**common, generator=torch.Generator().manual_seed(5)).images
    out = ours(**common, generator=torch.Generator().manual_seed(5), progress=False)
    return out.images, expected, out.workflow


def test_inpainting_unet_matches_diffusers(inpaint_repo: Path) -> None:
    mask = PIL.Image.fromarray((mask_array() * 255).astype("uint8"))
    got, expected, workflow = compare(inpaint_repo, mask_image=mask, negative_prompt="blurry", guidance_scale=6.0)
    assert workflow == "inpaint"
    assert got.shape == expected.shape == (1, SIZE, SIZE, 3)
    assert np.abs(got - expected).max() < 1e-5


def test_inpainting_unet_with_strength_matches_diffusers(inpaint_repo: Path) -> None:
    # strength < 1 encodes the image before drawing the noise: the generator order changes
    got, expected, _ = compare(inpaint_repo, mask_image=mask_array(), strength=0.7, num_images_per_prompt=2)
    assert got.shape == (2, SIZE, SIZE, 3)
    assert np.abs(got - expected).max() < 1e-5


def test_plain_unet_blend_matches_diffusers(plain_repo: Path) -> None:
    # a 4-channel UNet: the kept region is re-noised and blended after every (stochastic) step
    mask = torch.from_numpy(mask_array())[None, None]
    got, expected, _ = compare(plain_repo, mask_image=mask, strength=0.75, num_images_per_prompt=2, num_inference_steps=4)
    assert np.abs(got - expected).max() < 1e-5


def test_plain_unet_keeps_the_unmasked_region(plain_repo: Path) -> None:
    ours = Pipeline.from_pretrained(str(plain_repo))
    mask = mask_array()
    out = ours(prompt="x", image=image(), mask_image=mask, strength=0.5, num_inference_steps=2, output_type="latent", progress=False)
    kept = torch.from_numpy(mask[::2, ::2] < 0.5)  # the tiny VAE downsamples by 2
    assert out.images.shape == (1, 4, 16, 16)
    # after the last step the kept region is exactly the clean image latents
    assert torch.equal(out.images[..., kept], out.image_latents[..., kept])


def test_mask_without_image_is_reported(inpaint_repo: Path) -> None:
    ours = Pipeline.from_pretrained(str(inpaint_repo))
    with pytest.raises(InputError, match=r"\[workflow\.inpaint\.prepare_images\] image: is required but was not given"):
        ours(prompt="x", mask_image=mask_array(), progress=False)


def test_mask_size_mismatch_is_reported_before_any_work(inpaint_repo: Path) -> None:
    ours = Pipeline.from_pretrained(str(inpaint_repo))
    calls: list[str] = []
    for name in ("unet", "vae", "text_encoder"):
        ours.components[name].register_forward_pre_hook(lambda *_, name=name: calls.append(name))
    with pytest.raises(InputError) as info:
        ours(prompt="x", image=image(), mask_image=np.zeros((24, SIZE)), progress=False)
    assert "[workflow.inpaint.prepare_images] mask_image: mask_image is 24x32 but image is 32x32" in str(info.value)
    with pytest.raises(InputError, match=r"mask_image: mask_image has shape \(1, 2, 32, 32\)"):
        ours(prompt="x", image=image(), mask_image=torch.zeros(1, 2, SIZE, SIZE), progress=False)
    assert calls == []
