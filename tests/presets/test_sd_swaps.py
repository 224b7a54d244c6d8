"""Swapping the scheduler or the guider of a built SD 1.5 / SDXL preset, and sequential guidance passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.components import schedulers
from diffblocks.components.guiders import AdaptiveProjectedGuidance, PerturbedAttentionGuidance
from tests.presets.sd_fixtures import tiny_sd15, tiny_sdxl

SIZE = 16  # 8x8 latents: enough to see every block run, cheap on a CPU
# the scheduler each family is swapped to (SD 1.5 repositories ship PNDM, SDXL ones Euler)
SWAP = {"sd15": "EulerDiscreteScheduler", "sdxl": "DPMSolverMultistepScheduler"}


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    make = tiny_sd15 if request.param == "sd15" else tiny_sdxl
    return request.param, make(tmp_path_factory.mktemp(request.param))


def run(pipe: Pipeline, **kwargs: Any) -> Any:
    call: dict[str, Any] = dict(prompt="a red circle", negative_prompt="blurry", height=SIZE, width=SIZE, num_inference_steps=2)
    call.update(kwargs)
    return pipe(**call, generator=torch.Generator().manual_seed(11), output_type="np", progress=False)


def test_swapped_scheduler_matches_diffusers_with_the_same_swap(family: tuple[str, Path]) -> None:
    import diffusers

    name, repo = family
    ours = Pipeline.from_pretrained(str(repo))
    config = ours.components["scheduler"].to_config()
    ours.update_components(scheduler=getattr(schedulers, SWAP[name]).from_config(config))
    assert type(ours.components["scheduler"]).__name__ == SWAP[name]

    ref_cls = diffusers.StableDiffusionPipeline if name == "sd15" else diffusers.StableDiffusionXLPipeline
    extra = {"safety_checker": None} if name == "sd15" else {"add_watermarker": False}
    ref = ref_cls.from_pretrained(repo, **extra)
    ref.scheduler = getattr(diffusers, SWAP[name]).from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red circle", negative_prompt="blurry", height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=5.0)
    expected = ref(**kwargs, generator=torch.Generator().manual_seed(11), output_type="np").images
    assert np.abs(run(ours, guidance_scale=5.0).images - expected).max() < 1e-5


def test_swapped_guiders_run_every_workflow(family: tuple[str, Path]) -> None:
    name, repo = family
    pipe = Pipeline.from_pretrained(str(repo))
    plain = run(pipe).images
    guiders = [
        AdaptiveProjectedGuidance(guidance_scale=5.0, adaptive_projected_guidance_momentum=-0.5),
        PerturbedAttentionGuidance.for_family(name, perturbed_guidance_scale=3.0, perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0),
    ]
    image = (plain[0] * 255).astype("uint8")
    mask = np.zeros((SIZE, SIZE), dtype=np.float32)
    mask[: SIZE // 2] = 1.0
    for guider, workflow in zip(guiders, ({"image": image, "strength": 0.7}, {"image": image, "mask_image": mask})):
        pipe.update_components(guider=guider)
        assert pipe.components["guider"] is guider
        out = run(pipe)
        assert np.isfinite(out.images).all() and np.abs(out.images - plain).max() > 1e-5
        assert np.isfinite(run(pipe, **workflow).images).all()


@pytest.mark.parametrize("guider", ["cfg", "pag"])
def test_sequential_guidance_passes_give_the_batched_image(family: tuple[str, Path], guider: str) -> None:
    name, repo = family
    pipe = Pipeline.from_pretrained(str(repo))
    if guider == "pag":
        pipe.update_components(guider=PerturbedAttentionGuidance.for_family(name, perturbed_guidance_start=0.0))
    mask = np.zeros((SIZE, SIZE), dtype=np.float32)
    mask[4:12, 4:12] = 1.0
    image = np.random.default_rng(0).random((SIZE, SIZE, 3)).astype(np.float32)
    for extra in ({}, {"image": image, "mask_image": mask, "strength": 0.8}):
        prompts = ["a red circle", "a cat"] if not extra else "a red circle"
        batched = run(pipe, prompt=prompts, negative_prompt=None, **extra).images
        sequential = run(pipe, prompt=prompts, negative_prompt=None, guidance_batched=False, **extra).images
        assert np.abs(batched - sequential).max() < 1e-4  # float rounding only: batch size changes the kernels
