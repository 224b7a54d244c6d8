"""Flux ControlNet and ControlNet-Union against diffusers' FluxControlNetPipeline on tiny random weights: same seed, same image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffblocks.blocks import InputError, Pipeline
from diffblocks.components.models.controlnet import FluxControlNetModel
from diffblocks.presets.controlnet import with_controlnet
from tests.controlnet.flux_fixtures import tiny_flux_controlnet
from tests.controlnet.test_controlnet import control_image
from tests.presets.flux_fixtures import tiny_flux

H, W = 32, 48
TOLERANCE = 1e-5  # float32 kernels differ in summation order between the libraries (see tests/presets/test_flux.py)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux_controlnet")
    return {
        "flux": tiny_flux(root / "flux", double_blocks=3),
        "instantx": tiny_flux_controlnet(root / "instantx"),
        "union": tiny_flux_controlnet(root / "union", seed=2, num_mode=4),
    }


@pytest.fixture(scope="module")
def base(folders: dict[str, Path]) -> Pipeline:
    return Pipeline.from_pretrained(str(folders["flux"]))


def reference(folders: dict[str, Path], *names: str) -> Any:
    import diffusers

    nets = [diffusers.FluxControlNetModel.from_pretrained(folders[name]) for name in names]
    controlnet = nets[0] if len(nets) == 1 else diffusers.FluxMultiControlNetModel(nets)
    ref = diffusers.FluxControlNetPipeline.from_pretrained(folders["flux"], controlnet=controlnet)
    ref.set_progress_bar_config(disable=True)
    return ref


def run_both(ours: Pipeline, ref: Any, **kwargs: Any) -> tuple[Any, np.ndarray]:
    expected = ref(**kwargs, generator=torch.Generator().manual_seed(5), output_type="np").images
    out = ours(**kwargs, generator=torch.Generator().manual_seed(5), output_type="np", progress=False)
    return out, expected


KWARGS = dict(prompt=["a red circle", "a blue square"], height=H, width=W, num_inference_steps=3, guidance_scale=3.5,
              max_sequence_length=16)  # fmt: skip


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(controlnet_conditioning_scale=0.6, control_guidance_start=0.3, control_guidance_end=1.0, num_images_per_prompt=2),
        dict(true_cfg_scale=2.0, negative_prompt=["blurry", "dark"]),
    ],
    ids=["plain", "scale-window-and-images-per-prompt", "true-cfg"],
)
def test_flux_controlnet_matches_diffusers(folders: dict[str, Path], base: Pipeline, settings: dict[str, Any]) -> None:
    ours = with_controlnet(base, FluxControlNetModel.from_pretrained(folders["instantx"]))
    kwargs = {**KWARGS, "control_image": control_image(0, 40), **settings}
    out, expected = run_both(ours, reference(folders, "instantx"), **kwargs)
    assert out.workflow == "text2img" and out.images.shape == expected.shape
    assert np.abs(out.images - expected).max() < TOLERANCE
    plain = base(**{k: v for k, v in kwargs.items() if "control" not in k}, generator=torch.Generator().manual_seed(5),
                 output_type="np", progress=False)  # fmt: skip
    assert np.abs(plain.images - expected).max() > 1e-3  # the control changes the image


def test_flux_controlnet_union_matches_diffusers(folders: dict[str, Path], base: Pipeline) -> None:
    union = FluxControlNetModel.from_pretrained(folders["union"])
    ours = with_controlnet(base, union)
    kwargs = {**KWARGS, "control_image": control_image(1), "control_mode": 2}
    out, expected = run_both(ours, reference(folders, "union"), **kwargs)
    assert np.abs(out.images - expected).max() < TOLERANCE
    other = ours(**{**kwargs, "control_mode": 0}, generator=torch.Generator().manual_seed(5), output_type="np", progress=False)
    assert np.abs(other.images - expected).max() > 1e-4  # the mode is read


def test_several_flux_controlnets_match_diffusers(folders: dict[str, Path], base: Pipeline) -> None:
    nets = [FluxControlNetModel.from_pretrained(folders[name]) for name in ("instantx", "union")]
    ours = with_controlnet(base, nets)
    kwargs = {**KWARGS, "control_image": [control_image(0), control_image(1)], "control_mode": [None, 3],
              "controlnet_conditioning_scale": [0.7, 1.2]}  # fmt: skip
    out, expected = run_both(ours, reference(folders, "instantx", "union"), **kwargs)
    assert np.abs(out.images - expected).max() < TOLERANCE


def test_bad_flux_control_input_is_refused(folders: dict[str, Path], base: Pipeline) -> None:
    union = FluxControlNetModel.from_pretrained(folders["union"])
    ours = with_controlnet(base, union)
    kwargs = {**KWARGS, "control_image": control_image(1)}
    cases = [
        (dict(control_mode=4), "knows 4 control modes (0..3), got control_mode 4"),
        (dict(), "ControlNet-Union (num_mode=4): pass control_mode"),
        (dict(control_mode=[1, 2]), "control_mode has 2 values but there are 1 control images"),
        (dict(control_mode=1, control_image=[control_image(1)] * 3), "control_image has 3 images but the run has 2 prompt(s)"),
        (dict(control_mode=1, control_guidance_start=0.8, control_guidance_end=0.2), "control_guidance_start 0.8 is after"),
        (dict(control_mode=1, control_image=torch.rand(1, 4, H, W)), "control_image has 4 channels, but Flux ControlNets read RGB"),
    ]
    for changes, message in cases:
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ours(**{**kwargs, **changes}, progress=False)
    both = with_controlnet(base, [union, FluxControlNetModel.from_pretrained(folders["instantx"])])
    with pytest.raises(InputError, match="control_mode has 3 values but there are 2 control images"):
        both(**{**KWARGS, "control_image": [control_image(1)] * 2, "control_mode": [1, None, 2]}, progress=False)
    plain = with_controlnet(base, FluxControlNetModel.from_pretrained(folders["instantx"]))
    with pytest.raises(InputError, match="not a ControlNet-Union"):
        plain(**{**kwargs, "control_mode": 1}, progress=False)


def test_a_controlnet_of_another_family_is_refused_at_build_time(folders: dict[str, Path], base: Pipeline, tmp_path: Path) -> None:
    from diffblocks.components.models.controlnet import ControlNetModel, FluxControlNetParams
    from tests.controlnet.test_controlnet import SD15_NET, tiny_controlnet
    from tests.presets.sd_fixtures import tiny_sd15

    flux_net = FluxControlNetModel.from_pretrained(folders["instantx"])
    sd15 = Pipeline.from_pretrained(str(tiny_sd15(tmp_path / "sd15")))
    with pytest.raises(ValueError, match=r"the ControlNet \(Flux, inner_dim=32, joint_attention_dim=32\) does not fit the UNet \(SD 1.x/2.x"):
        with_controlnet(sd15, flux_net)
    unet_net = ControlNetModel.from_pretrained(tiny_controlnet(tmp_path / "sd15_net", **SD15_NET))
    with pytest.raises(ValueError, match=r"\(SD 1.x/2.x, block_out_channels=\(32, 64\).*\) does not fit the transformer \(Flux, inner_dim=32"):
        with_controlnet(base, unet_net)
    wider = FluxControlNetModel(FluxControlNetParams(**{**flux_net.params.model_dump(), "joint_attention_dim": 64}))
    with pytest.raises(ValueError, match=r"does not fit the transformer \(Flux.*\): joint_attention_dim differs \(64 vs 32\)"):
        with_controlnet(base, wider)
    schnell_net = FluxControlNetModel(FluxControlNetParams(**{**flux_net.params.model_dump(), "guidance_embeds": False}))
    with pytest.raises(ValueError, match=r"guidance_embeds differs \(False vs True\)"):
        with_controlnet(base, schnell_net)


def test_img2img_and_a_gray_control_image_run(folders: dict[str, Path], base: Pipeline) -> None:
    ours = with_controlnet(base, FluxControlNetModel.from_pretrained(folders["instantx"]))
    gray = torch.linspace(0, 1, W).expand(1, 1, H, W)
    out = ours(**{**KWARGS, "prompt": "x"}, image=control_image(3, 40), strength=0.6, control_image=gray, output_type="np", progress=False)
    assert out.workflow == "img2img" and out.images.shape == (1, H, W, 3)
    same = ours(**{**KWARGS, "prompt": "x"}, control_image=gray.expand(1, 3, H, W), generator=torch.Generator().manual_seed(1),
                output_type="np", progress=False)  # fmt: skip
    again = ours(**{**KWARGS, "prompt": "x"}, control_image=gray, generator=torch.Generator().manual_seed(1), output_type="np", progress=False)
    assert np.array_equal(same.images, again.images)  # a gray image is read as RGB
