"""Every diffusers ControlNet pipeline folder loads as a preset: a folder that diffusers' pipeline saved, the same image.

Each case builds diffusers' pipeline from tiny random weights, saves it with ``save_pretrained``,
loads the folder with ``Pipeline.from_pretrained`` and runs both with the same inputs and seed.
(Text-to-image SD 1.5 and SDXL folders, and several nets, are in ``test_presets.py``; several
unions in ``test_multi_union.py``.)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from diffblocks.blocks import Pipeline
from tests.controlnet.flux_fixtures import tiny_flux_controlnet
from tests.controlnet.test_controlnet import SD15_NET, SDXL_NET, SIZE, control_image, tiny_controlnet
from tests.controlnet.test_union_model import tiny_union
from tests.presets.flux_fixtures import tiny_flux
from tests.presets.sd_fixtures import tiny_sd15, tiny_sdxl


def mask() -> PIL.Image.Image:
    array = np.zeros((SIZE, SIZE), dtype=np.uint8)
    array[4:20, 10:30] = 255
    return PIL.Image.fromarray(array)


def sd15_base(root: Path) -> Path:
    return tiny_sd15(root / "sd15")


def sdxl_base(root: Path) -> Path:
    return tiny_sdxl(root / "sdxl")


def flux_base(root: Path) -> Path:
    return tiny_flux(root / "flux", double_blocks=3)


def sd15_net(root: Path) -> Any:
    import diffusers

    return diffusers.ControlNetModel.from_pretrained(tiny_controlnet(root / "sd15_net", **SD15_NET))


def sdxl_net(root: Path) -> Any:
    import diffusers

    return diffusers.ControlNetModel.from_pretrained(tiny_controlnet(root / "sdxl_net", **SDXL_NET))


def union_net(root: Path) -> Any:
    import diffusers

    return diffusers.ControlNetUnionModel.from_pretrained(tiny_union(root / "union"))


def flux_net(root: Path) -> Any:
    import diffusers

    return diffusers.FluxControlNetModel.from_pretrained(tiny_flux_controlnet(root / "flux_union", seed=2, num_mode=4))


SD = dict(prompt=["a red circle", "a blue square"], negative_prompt=["blurry", "dark"], height=SIZE, width=SIZE, num_inference_steps=3,
          guidance_scale=5.0, controlnet_conditioning_scale=0.8)  # fmt: skip
FLUX = dict(prompt="a red circle", height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=3.5, max_sequence_length=16,
            controlnet_conditioning_scale=0.8, control_mode=1)  # fmt: skip
IMG2IMG = dict(image=control_image(3), strength=0.7)
INPAINT = dict(image=control_image(3), mask_image=mask(), strength=0.9)
UNION = dict(control_mode=[1, 3], control_image=[control_image(0), control_image(1)])

# diffusers' pipeline class -> (base folder, ControlNet, call); the family it loads as follows from the class
CASES: dict[str, tuple[Callable[[Path], Path], Callable[[Path], Any], dict[str, Any]]] = {
    "StableDiffusionControlNetImg2ImgPipeline": (sd15_base, sd15_net, {**SD, **IMG2IMG}),
    "StableDiffusionControlNetInpaintPipeline": (sd15_base, sd15_net, {**SD, **INPAINT}),
    "StableDiffusionXLControlNetImg2ImgPipeline": (sdxl_base, sdxl_net, {**SD, **IMG2IMG}),
    "StableDiffusionXLControlNetInpaintPipeline": (sdxl_base, sdxl_net, {**SD, **INPAINT}),
    "StableDiffusionXLControlNetUnionPipeline": (sdxl_base, union_net, {**SD, **UNION}),
    "StableDiffusionXLControlNetUnionImg2ImgPipeline": (sdxl_base, union_net, {**SD, **IMG2IMG, **UNION}),
    "StableDiffusionXLControlNetUnionInpaintPipeline": (sdxl_base, union_net, {**SD, **INPAINT, **UNION}),
    "FluxControlNetPipeline": (flux_base, flux_net, FLUX),
    "FluxControlNetImg2ImgPipeline": (flux_base, flux_net, {**FLUX, **IMG2IMG}),
    "FluxControlNetInpaintPipeline": (flux_base, flux_net, {**FLUX, **INPAINT}),
}
WORKFLOW = {"Img2Img": "img2img", "Inpaint": "inpaint"}
# The tiny random union amplifies its input's rounding about 10^4-fold (residuals of magnitude 40): in img2img the
# encoded image's latents differ from diffusers' by 2e-7, which ends as 5e-5 in the image. Given diffusers' own
# inputs, the net's residuals are equal to the last bit (and the text-to-image and inpaint cases meet 1e-5).
TOLERANCE = {"StableDiffusionXLControlNetUnionImg2ImgPipeline": 1e-4}


@pytest.mark.parametrize("class_name", list(CASES))
def test_a_diffusers_controlnet_pipeline_folder_gives_its_image(tmp_path: Path, class_name: str) -> None:
    import diffusers

    base, net, call = CASES[class_name]
    ref = getattr(diffusers, class_name).from_pretrained(base(tmp_path), controlnet=net(tmp_path), **extras(class_name))
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(tmp_path / "pipeline")
    assert json.loads((tmp_path / "pipeline" / "model_index.json").read_text())["_class_name"] == class_name

    ours = Pipeline.from_pretrained(str(tmp_path / "pipeline"))
    family = "flux" if class_name.startswith("Flux") else "sdxl" if "XL" in class_name else "sd15"
    assert ours.preset is not None and ours.preset.family == f"{family}_controlnet"
    call = {**call, "control_image": call.get("control_image", control_image())}
    expected = ref(**call, generator=torch.Generator().manual_seed(5), output_type="np").images
    out = ours(**call, generator=torch.Generator().manual_seed(5), output_type="np", progress=False)
    assert out.workflow == next((w for key, w in WORKFLOW.items() if key in class_name), "text2img")
    assert out.images.shape == expected.shape
    assert np.abs(out.images - expected).max() < TOLERANCE.get(class_name, 1e-5)


def extras(class_name: str) -> dict[str, Any]:
    """What diffusers' pipeline needs beyond the folder: no safety checker (SD 1.5), no watermark (SDXL)."""
    if class_name.startswith("StableDiffusionXL"):
        return {"add_watermarker": False}
    if class_name.startswith("StableDiffusion"):
        return {"safety_checker": None}
    return {}
