"""Guess mode for SD 1.5 and SDXL ControlNets against diffusers' guess_mode=True: same seed, same image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.components.models.controlnet import ControlNetModel
from diffblocks.presets.controlnet import with_controlnet
from tests.controlnet.test_controlnet import SIZE, control_image, run_both, sd15, sd15_reference, sdxl  # noqa: F401 (fixtures)


@pytest.mark.parametrize(
    "settings",
    [dict(guidance_scale=6.0), dict(guidance_scale=1.0), dict(guidance_scale=6.0, control_guidance_end=0.5, controlnet_conditioning_scale=0.7)],
    ids=["cfg", "no-cfg", "window-and-scale"],
)
def test_sd15_guess_mode_matches_diffusers(sd15: tuple[Path, Path], settings: dict[str, Any]) -> None:
    repo, net = sd15
    ours = with_controlnet(Pipeline.from_pretrained(str(repo)), ControlNetModel.from_pretrained(net))
    kwargs = dict(prompt=["a red circle", "a blue square"], negative_prompt=["blurry", "dark"], height=SIZE, width=SIZE,
                  num_inference_steps=4, control_image=control_image(), **settings)  # fmt: skip
    out, expected = run_both(ours, sd15_reference(repo, net), **kwargs, guess_mode=True)
    assert np.abs(out.images - expected).max() < 1e-5
    normal = ours(**{k: v for k, v in kwargs.items() if k != "control_image"}, control_image=kwargs["control_image"],
                  generator=torch.Generator().manual_seed(5), output_type="np", progress=False)  # fmt: skip
    assert np.abs(normal.images - expected).max() > 1e-4  # guess mode changes the image


def test_sdxl_guess_mode_with_two_controlnets_matches_diffusers(sdxl: tuple[Path, Path]) -> None:
    import diffusers

    repo, net = sdxl
    ours = with_controlnet(Pipeline.from_pretrained(str(repo)), [ControlNetModel.from_pretrained(net)] * 2)
    nets = diffusers.MultiControlNetModel([diffusers.ControlNetModel.from_pretrained(net)] * 2)
    ref = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(repo, controlnet=nets, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red circle", height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=5.0,
                  controlnet_conditioning_scale=[0.8, 0.5], control_image=[control_image(0), control_image(1)])  # fmt: skip
    out, expected = run_both(ours, ref, **kwargs, guess_mode=True)
    assert np.abs(out.images - expected).max() < 1e-5
