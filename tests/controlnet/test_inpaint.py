"""A ControlNet beside an inpainting UNet (9 input channels): diffusers' StableDiffusionControlNetInpaintPipeline's image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.components.models.controlnet import ControlNetModel
from diffblocks.presets.controlnet import with_controlnet
from tests.controlnet.test_controlnet import SD15_NET, SIZE, control_image, tiny_controlnet
from tests.presets.sd_fixtures import tiny_sd15


def mask() -> PIL.Image.Image:
    array = np.zeros((SIZE, SIZE), dtype=np.uint8)
    array[4:20, 10:30] = 255
    return PIL.Image.fromarray(array)


@pytest.mark.parametrize("settings", [dict(guidance_scale=6.0), dict(guidance_scale=6.0, strength=0.7, control_guidance_end=0.5)],
                         ids=["full", "strength-and-window"])  # fmt: skip
def test_inpainting_unet_with_controlnet_matches_diffusers(tmp_path: Path, settings: dict) -> None:
    import diffusers

    repo, net = tiny_sd15(tmp_path / "inpaint", in_channels=9), tiny_controlnet(tmp_path / "net", **SD15_NET)
    ours = with_controlnet(Pipeline.from_pretrained(str(repo)), ControlNetModel.from_pretrained(net))
    ref = diffusers.StableDiffusionControlNetInpaintPipeline.from_pretrained(
        repo, controlnet=diffusers.ControlNetModel.from_pretrained(net), safety_checker=None)  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    # diffusers' inpaint ControlNet pipeline alone defaults to controlnet_conditioning_scale=0.5; ours, to 1.0 everywhere
    common = dict(prompt="a red circle", negative_prompt="blurry", image=control_image(3), mask_image=mask(),
                  height=SIZE, width=SIZE, num_inference_steps=3, output_type="np", controlnet_conditioning_scale=1.0, **settings)  # fmt: skip
    expected = ref(**common, control_image=control_image(), generator=torch.Generator().manual_seed(5)).images
    out = ours(**common, control_image=control_image(), generator=torch.Generator().manual_seed(5), progress=False)
    assert out.workflow == "inpaint" and out.images.shape == expected.shape == (1, SIZE, SIZE, 3)
    assert np.abs(out.images - expected).max() < 1e-5
    plain_kwargs = {k: v for k, v in common.items() if "control" not in k}
    plain = Pipeline.from_pretrained(str(repo))(**plain_kwargs, generator=torch.Generator().manual_seed(5), progress=False)
    assert np.abs(plain.images - expected).max() > 1e-3  # the control changes the image
