"""SDXL ControlNet-Union against diffusers' StableDiffusionXLControlNetUnionPipeline on tiny random weights: same image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffblocks.blocks import InputError, Pipeline
from diffblocks.components.models.controlnet import ControlNetModel, ControlNetUnionModel, MultiControlNetUnionModel
from diffblocks.presets.controlnet import with_controlnet
from tests.controlnet.test_controlnet import SDXL_NET, SIZE, control_image, tiny_controlnet
from tests.controlnet.test_union_model import tiny_union
from tests.presets.sd_fixtures import tiny_sdxl


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("controlnet_union")
    return tiny_sdxl(root / "sdxl"), tiny_union(root / "union")


@pytest.fixture(scope="module")
def controlled(folders: tuple[Path, Path]) -> Pipeline:
    repo, net = folders
    return with_controlnet(Pipeline.from_pretrained(str(repo)), ControlNetUnionModel.from_pretrained(net))


@pytest.mark.parametrize(
    "settings",
    [
        dict(control_image=control_image(0), control_mode=2),
        dict(control_image=[control_image(0), control_image(1)], control_mode=[0, 3], controlnet_conditioning_scale=[0.6, 1.1],
             control_guidance_end=[1.0, 0.5]),
        # diffusers' union pipeline fails in guess mode with CFG (its control types keep the doubled batch): compare without
        dict(control_image=control_image(1), control_mode=[1], guess_mode=True, controlnet_conditioning_scale=0.8, guidance_scale=1.0),
    ],
    ids=["one-mode", "two-modes-scales-and-window", "guess-mode"],
)  # fmt: skip
def test_sdxl_union_matches_diffusers(folders: tuple[Path, Path], controlled: Pipeline, settings: dict[str, Any]) -> None:
    import diffusers

    repo, net = folders
    union = diffusers.ControlNetUnionModel.from_pretrained(net)
    ref = diffusers.StableDiffusionXLControlNetUnionPipeline.from_pretrained(repo, controlnet=union, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=["a red circle", "a blue square"], height=SIZE, width=SIZE, num_inference_steps=3, **{"guidance_scale": 5.0, **settings})
    expected = ref(**{k: v for k, v in kwargs.items() if k != "control_image"}, control_image=kwargs["control_image"],
                   generator=torch.Generator().manual_seed(5), output_type="np").images  # fmt: skip
    out = controlled(**kwargs, generator=torch.Generator().manual_seed(5), output_type="np", progress=False)
    assert out.images.shape == expected.shape == (2, SIZE, SIZE, 3)
    assert np.abs(out.images - expected).max() < 1e-5


def test_bad_union_input_is_refused(folders: tuple[Path, Path], controlled: Pipeline, tmp_path: Path) -> None:
    kwargs = dict(prompt="x", height=SIZE, width=SIZE, num_inference_steps=2, progress=False)
    cases = [
        (dict(control_image=control_image(), control_mode=4), r"knows 4 control types \(0..3\), got control_mode 4"),
        (dict(control_image=control_image()), "reads the control type of each image: pass control_mode"),
        (dict(control_image=[control_image()] * 2, control_mode=[1, 2, 3]), "must be a list of 3 control images"),
        (dict(control_image=[control_image()] * 2, control_mode=[1, 1]), r"control_mode \[1, 1\] names a control type twice"),
        (dict(control_image=[control_image()] * 2, control_mode=[1, 2], controlnet_conditioning_scale=[1.0] * 3),
         "controlnet_conditioning_scale has 3 values but there are 2"),
    ]  # fmt: skip
    for changes, message in cases:
        with pytest.raises(InputError, match=message):
            controlled(**kwargs, **changes)
    repo, net = folders
    plain = with_controlnet(Pipeline.from_pretrained(str(repo)), ControlNetModel.from_pretrained(tiny_controlnet(tmp_path / "n", **SDXL_NET)))
    with pytest.raises(InputError, match="control_mode 1 is given, but the ControlNet is not a ControlNet-Union"):
        plain(**kwargs, control_image=control_image(), control_mode=1)
    beside = with_controlnet(Pipeline.from_pretrained(str(repo)), [ControlNetUnionModel.from_pretrained(net), plain.components["controlnet"]])
    assert isinstance(beside.components["controlnet"], MultiControlNetUnionModel)  # tests/controlnet/test_multi_union.py
