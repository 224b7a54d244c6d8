"""SD 1.5 / SDXL repositories that ship DEIS, DPM-Solver single-step, KDPM2 (ancestral) or EDM Euler load
and give diffusers' image."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.components import schedulers
from tests.presets.sd_fixtures import tiny_sd15, tiny_sdxl

SIZE = 16  # 8x8 latents
# the scheduler config each repository ships: diffusers' class loaded from the model's own config
REPOS: list[tuple[str, str, dict[str, Any]]] = [
    ("sd15", "DEISMultistepScheduler", {"solver_order": 3}),
    ("sd15", "DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    ("sd15", "KDPM2DiscreteScheduler", {}),
    ("sd15", "KDPM2AncestralDiscreteScheduler", {}),
    ("sd15", "EDMEulerScheduler", {}),
    ("sdxl", "EDMEulerScheduler", {"prediction_type": "v_prediction", "sigma_max": 120.0, "sigma_data": 1.0}),  # CosXL
    ("sdxl", "KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
]


@pytest.fixture(scope="module")
def tiny_repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "sd15": tiny_sd15(tmp_path_factory.mktemp("sd15")),
        "sdxl": tiny_sdxl(tmp_path_factory.mktemp("sdxl")),
    }


def _repo_with_scheduler(base: Path, folder: Path, name: str, changes: dict[str, Any]) -> Path:
    """A copy of ``base`` that ships diffusers' ``name`` (its folder and ``model_index.json``), as diffusers saves it.

    Beta-schedule classes take the model's noise schedule; EDM configs carry none.
    """
    import diffusers

    repo = Path(shutil.copytree(base, folder / "repo"))
    model_config = {} if name == "EDMEulerScheduler" else dict(diffusers.PNDMScheduler.load_config(repo / "scheduler"))
    scheduler = getattr(diffusers, name).from_config({**model_config, **changes})
    shutil.rmtree(repo / "scheduler")
    scheduler.save_pretrained(repo / "scheduler")
    index = json.loads((repo / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", name]
    (repo / "model_index.json").write_text(json.dumps(index))
    return repo


@pytest.mark.parametrize(("family", "name", "changes"), REPOS, ids=[f"{f}-{n}" for f, n, _ in REPOS])
def test_repository_scheduler_loads_and_matches_diffusers(
    tiny_repos: dict[str, Path], tmp_path: Path, family: str, name: str, changes: dict[str, Any]
) -> None:
    import diffusers

    repo = _repo_with_scheduler(tiny_repos[family], tmp_path, name, changes)
    ours = Pipeline.from_pretrained(str(repo))
    assert type(ours.components["scheduler"]) is getattr(schedulers, name)

    ref_cls = diffusers.StableDiffusionPipeline if family == "sd15" else diffusers.StableDiffusionXLPipeline
    extra = {"safety_checker": None} if family == "sd15" else {"add_watermarker": False}
    ref = ref_cls.from_pretrained(repo, **extra)
    assert type(ref.scheduler).__name__ == name
    ref.set_progress_bar_config(disable=True)
    kwargs: dict[str, Any] = dict(prompt="a red circle", negative_prompt="blurry", guidance_scale=5.0)
    kwargs.update(height=SIZE, width=SIZE, num_inference_steps=3)
    expected = ref(**kwargs, generator=torch.Generator().manual_seed(11), output_type="np").images
    image = ours(**kwargs, generator=torch.Generator().manual_seed(11), output_type="np", progress=False).images
    assert np.abs(image - expected).max() < 1e-5


@pytest.mark.parametrize("name", ["KDPM2AncestralDiscreteScheduler", "DPMSolverSinglestepScheduler", "EDMEulerScheduler"])
def test_image_to_image_starts_where_diffusers_does(tiny_repos: dict[str, Path], tmp_path: Path, name: str) -> None:
    """``strength`` skips whole steps: both KDPM2 calls of a step, or a single-step solver's step part-way."""
    import diffusers
    import PIL.Image

    repo = _repo_with_scheduler(tiny_repos["sd15"], tmp_path, name, {"solver_order": 3} if "Single" in name else {})
    ours = Pipeline.from_pretrained(str(repo))
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(repo, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    image = PIL.Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype("uint8"))
    kwargs: dict[str, Any] = dict(prompt="a red circle", image=image, strength=0.6, num_inference_steps=5)
    expected = ref(**kwargs, generator=torch.Generator().manual_seed(3), output_type="np").images
    out = ours(**kwargs, generator=torch.Generator().manual_seed(3), output_type="np", progress=False)
    assert out.workflow == "img2img"
    assert np.abs(out.images - expected).max() < 1e-5
