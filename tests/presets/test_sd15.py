"""SD 1.5 preset against diffusers on tiny random weights: same seed, same image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from diffblocks.blocks import Pipeline
from tests.presets.sd_fixtures import tiny_sd15


@pytest.fixture(scope="module")
def sd15_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd15(tmp_path_factory.mktemp("sd15"))


def reference(repo: Path, scheduler: str | None = None):  # type: ignore[no-untyped-def]
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(repo, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_text2img_matches_diffusers(sd15_repo: Path) -> None:
    ours = Pipeline.from_pretrained(str(sd15_repo))
    ref = reference(sd15_repo)
    kwargs = dict(prompt=["a red circle", "a blue square"], negative_prompt=["blurry", "dark"], height=32, width=32, num_inference_steps=4, guidance_scale=6.0)
    expected = ref(**kwargs, generator=torch.Generator().manual_seed(7), output_type="np").images
    out = ours(**kwargs, generator=torch.Generator().manual_seed(7), output_type="np", progress=False)
    assert out.workflow == "text2img"
    assert out.images.shape == expected.shape == (2, 32, 32, 3)
    assert np.abs(out.images - expected).max() < 1e-5


def test_img2img_matches_diffusers(sd15_repo: Path) -> None:
    import diffusers

    ours = Pipeline.from_pretrained(str(sd15_repo))
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(sd15_repo, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    image = PIL.Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    kwargs = dict(prompt="a red circle", image=image, strength=0.6, num_inference_steps=5, guidance_scale=5.0, num_images_per_prompt=2)
    expected = ref(**kwargs, generator=torch.Generator().manual_seed(3), output_type="np").images
    out = ours(**kwargs, generator=torch.Generator().manual_seed(3), output_type="np", progress=False)
    assert out.workflow == "img2img"
    assert np.abs(out.images - expected).max() < 1e-5
