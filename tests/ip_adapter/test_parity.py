"""IP-Adapter for SD 1.5 and SDXL against diffusers' ``load_ip_adapter`` on tiny random weights: same seed, same image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffblocks.blocks import Pipeline
from tests.ip_adapter.ip_files import SIZE, picture


def run_both(ours: Pipeline, ref: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    expected = ref(**kwargs, generator=torch.Generator().manual_seed(5), output_type="np").images
    out = ours(**kwargs, generator=torch.Generator().manual_seed(5), output_type="np", progress=False)
    return out.images, expected


def reference(kind: str, repo: Path) -> Any:
    import diffusers

    cls = diffusers.StableDiffusionPipeline if kind == "sd15" else diffusers.StableDiffusionXLPipeline
    extra = {"safety_checker": None} if kind == "sd15" else {"add_watermarker": False}
    ref = cls.from_pretrained(repo, **extra)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize(
    ("weight_name", "settings"),
    [
        ("plain.safetensors", dict(guidance_scale=6.0)),
        ("plain.safetensors", dict(guidance_scale=1.0)),
        ("plus.safetensors", dict(guidance_scale=6.0, negative_prompt="blurry")),
        ("full.safetensors", dict(guidance_scale=6.0)),
    ],
    ids=["plain-cfg", "plain-no-cfg", "plus", "full-face"],
)
def test_sd15_matches_diffusers(sd15: tuple[Path, Path], weight_name: str, settings: dict[str, Any]) -> None:
    repo, ip = sd15
    ours = Pipeline.from_pretrained(str(repo))
    plain = ours(prompt="a red circle", height=SIZE, width=SIZE, num_inference_steps=3, output_type="np",
                 generator=torch.Generator().manual_seed(5), progress=False, **settings).images  # fmt: skip
    ours.load_ip_adapter(str(ip), subfolder="models", weight_name=weight_name)
    ref = reference("sd15", repo)
    ref.load_ip_adapter(str(ip), subfolder="models", weight_name=weight_name)
    kwargs = dict(prompt="a red circle", height=SIZE, width=SIZE, num_inference_steps=3, ip_adapter_image=picture(), **settings)
    images, expected = run_both(ours, ref, **kwargs)
    assert images.shape == expected.shape == (1, SIZE, SIZE, 3)
    assert np.abs(images - expected).max() < 1e-5
    assert np.abs(images - plain).max() > 1e-3  # the image prompt changes the image


def test_sd15_scales_and_two_adapters_match_diffusers(sd15: tuple[Path, Path]) -> None:
    repo, ip = sd15
    ours = Pipeline.from_pretrained(str(repo))
    ref = reference("sd15", repo)
    names = ["plain.safetensors", "plus.safetensors"]
    for pipe in (ours, ref):
        pipe.load_ip_adapter(str(ip), subfolder="models", weight_name=names)
        pipe.set_ip_adapter_scale([0.5, {"down": {"block_1": 0.6}, "up": {"block_0": [0.0, 1.0]}}])
    kwargs = dict(prompt="a red circle", height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=5.0,
                  ip_adapter_image=[picture(0), [picture(1), picture(2)]])  # fmt: skip
    images, expected = run_both(ours, ref, **kwargs)
    assert np.abs(images - expected).max() < 1e-5


def test_sdxl_matches_diffusers(sdxl: tuple[Path, Path]) -> None:
    repo, ip = sdxl
    ours = Pipeline.from_pretrained(str(repo))
    ref = reference("sdxl", repo)
    for pipe in (ours, ref):
        pipe.load_ip_adapter(str(ip), subfolder="sdxl_models", weight_name=["plus.safetensors", "plain.safetensors"])
        pipe.set_ip_adapter_scale([0.8, {"up": {"block_0": [0.0, 1.0]}}])
    kwargs = dict(prompt="a red circle", height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=5.0,
                  ip_adapter_image=[picture(0), picture(1)])  # fmt: skip
    images, expected = run_both(ours, ref, **kwargs)
    assert images.shape == (1, SIZE, SIZE, 3)
    assert np.abs(images - expected).max() < 1e-5
