"""diffusers' ControlNet pipeline folders as presets: loaded as they are, saved in their layout, read back by both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.components.models.controlnet import ControlNetModel
from diffblocks.presets.controlnet import with_controlnet
from tests.controlnet.test_controlnet import SD15_NET, SDXL_NET, SIZE, control_image, run_both, tiny_controlnet
from tests.presets.sd_fixtures import tiny_sd15, tiny_sdxl


def diffusers_folder(kind: str, root: Path) -> tuple[Path, Any]:
    """A folder saved by diffusers' ControlNet pipeline of ``kind``, and that pipeline."""
    import diffusers

    if kind == "sd15":
        repo, net = tiny_sd15(root / "base"), tiny_controlnet(root / "net", **SD15_NET)
        ref = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
            repo, controlnet=diffusers.ControlNetModel.from_pretrained(net), safety_checker=None)  # fmt: skip
    else:
        repo, net = tiny_sdxl(root / "base"), tiny_controlnet(root / "net", **SDXL_NET)
        ref = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(
            repo, controlnet=diffusers.ControlNetModel.from_pretrained(net), add_watermarker=False)  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(root / "pipeline")
    return root / "pipeline", ref


KWARGS = dict(prompt="a red circle", negative_prompt="blurry", height=SIZE, width=SIZE, num_inference_steps=3,
              guidance_scale=5.0, controlnet_conditioning_scale=0.8)  # fmt: skip


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_a_diffusers_controlnet_folder_loads_saves_and_loads_back(tmp_path: Path, kind: str) -> None:
    import diffusers

    folder, ref = diffusers_folder(kind, tmp_path)
    ours = Pipeline.from_pretrained(str(folder))
    assert ours.preset is not None and ours.preset.family == f"{kind}_controlnet"
    out, expected = run_both(ours, ref, **KWARGS, control_image=control_image())
    assert np.abs(out.images - expected).max() < 1e-5

    saved = ours.save_pretrained(tmp_path / "ours")
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == type(ref).__name__ and index["controlnet"] == ["diffusers", "ControlNetModel"]
    again, _ = run_both(Pipeline.from_pretrained(str(saved)), ref, **KWARGS, control_image=control_image())
    assert np.array_equal(again.images, out.images)
    theirs = getattr(diffusers, type(ref).__name__).from_pretrained(saved)  # diffusers reads ours
    theirs.set_progress_bar_config(disable=True)
    _, expected_again = run_both(ours, theirs, **KWARGS, control_image=control_image())
    assert np.abs(expected_again - expected).max() < 1e-6


def test_a_controlnet_added_to_a_loaded_pipeline_saves_as_diffusers_controlnet_pipeline(tmp_path: Path) -> None:
    repo, net = tiny_sd15(tmp_path / "base"), tiny_controlnet(tmp_path / "net", **SD15_NET)
    ours = with_controlnet(Pipeline.from_pretrained(str(repo)), ControlNetModel.from_pretrained(net))
    saved = ours.save_pretrained(tmp_path / "ours")
    assert json.loads((saved / "model_index.json").read_text())["_class_name"] == "StableDiffusionControlNetPipeline"
    loaded = Pipeline.from_pretrained(str(saved))
    kwargs = dict(**KWARGS, control_image=control_image(), output_type="np", progress=False)
    first = ours(**kwargs, generator=torch.Generator().manual_seed(1)).images
    assert np.array_equal(loaded(**kwargs, generator=torch.Generator().manual_seed(1)).images, first)


def test_a_multi_controlnet_folder_loads_and_saves_as_diffusers_does(tmp_path: Path) -> None:
    import diffusers

    repo = tiny_sd15(tmp_path / "base")
    nets = [tiny_controlnet(tmp_path / "a", **SD15_NET), tiny_controlnet(tmp_path / "b", **SD15_NET, conditioning_channels=1)]
    ref = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        repo, controlnet=[diffusers.ControlNetModel.from_pretrained(net) for net in nets], safety_checker=None)  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(tmp_path / "pipeline")
    assert json.loads((tmp_path / "pipeline" / "model_index.json").read_text())["controlnet"] == ["diffusers", "MultiControlNetModel"]
    ours = Pipeline.from_pretrained(str(tmp_path / "pipeline"))
    assert len(ours.components["controlnet"]) == 2
    images = [control_image(0), torch.rand(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))]  # gray: 1 channel
    kwargs = dict(KWARGS, controlnet_conditioning_scale=[0.8, 0.5], control_image=images)
    out, expected = run_both(ours, ref, **kwargs)
    assert np.abs(out.images - expected).max() < 1e-5

    saved = ours.save_pretrained(tmp_path / "ours")
    assert (saved / "controlnet_1" / "config.json").is_file()
    again, _ = run_both(Pipeline.from_pretrained(str(saved)), ref, **kwargs)
    assert np.array_equal(again.images, out.images)
    theirs = diffusers.StableDiffusionControlNetPipeline.from_pretrained(saved)
    theirs.set_progress_bar_config(disable=True)
    assert len(theirs.controlnet.nets) == 2
