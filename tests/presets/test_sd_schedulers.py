"""SD 1.5 repositories that ship a distilled or SDE scheduler load with it and give diffusers' images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from diffblocks.blocks import Pipeline
from tests.presets.sd_fixtures import tiny_sd15

SIZE = 16


@pytest.fixture(scope="module", params=["LCMScheduler", "TCDScheduler", "DPMSolverSDEScheduler"])
def repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return request.param, tiny_sd15(tmp_path_factory.mktemp(request.param), scheduler=request.param)


@pytest.mark.filterwarnings("ignore:Should have:UserWarning")  # torchsde, on diffusers' side
@pytest.mark.parametrize("workflow", ["text2img", "img2img"])
def test_repository_scheduler_loads_and_gives_diffusers_image(repo: tuple[str, Path], workflow: str) -> None:
    import diffusers

    name, folder = repo
    ours = Pipeline.from_pretrained(str(folder))
    assert type(ours.components["scheduler"]).__name__ == name

    call: dict[str, Any] = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0)
    if workflow == "img2img":
        pixels = (np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype("uint8")
        call.update(image=PIL.Image.fromarray(pixels), strength=0.6)
        ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None)
    else:
        call.update(height=SIZE, width=SIZE)
        ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    # diffusers' SD pipelines hand TCD's step their own eta (default 0); ours reads TCD's, 0.3 by default
    extra = {"eta": 0.3} if name == "TCDScheduler" else {}
    expected = ref(**call, **extra, generator=torch.Generator().manual_seed(11), output_type="np").images
    out = ours(**call, generator=torch.Generator().manual_seed(11), output_type="np", progress=False)
    assert out.workflow == workflow
    assert np.abs(out.images - expected).max() < 1e-5
