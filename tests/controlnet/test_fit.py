"""A ControlNet that does not fit its denoiser is refused when a hand-built pipeline is built, naming both."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffblocks.blocks import Pipeline, PlanError
from diffblocks.components.models.controlnet import ControlNetModel, FluxControlNetModel, MultiControlNetModel
from diffblocks.components.models.flux import FluxTransformer2DModel
from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.presets import flux, sd15
from diffblocks.presets.controlnet import controlnet_blocks
from diffblocks.presets.flux_controlnet import flux_controlnet_blocks
from tests.controlnet.flux_fixtures import tiny_flux_controlnet
from tests.controlnet.test_controlnet import SD15_NET, SDXL_NET, tiny_controlnet
from tests.presets.flux_fixtures import tiny_flux
from tests.presets.sd_fixtures import tiny_sd15


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd15(tmp_path_factory.mktemp("fit") / "sd15")


def hand_built(repo: Path, controlnet: object) -> Pipeline:
    """The SD 1.5 blocks with ControlNet steps, put together by hand (not through with_controlnet)."""
    base = Pipeline.from_pretrained(str(repo))
    unet = UNet2DConditionModel.from_pretrained(repo / "unet")
    return Pipeline(controlnet_blocks(sd15.sd15_blocks()), {**base.components, "unet": unet, "controlnet": controlnet})


def test_a_fitting_controlnet_builds(sd: Path, tmp_path: Path) -> None:
    net = ControlNetModel.from_pretrained(tiny_controlnet(tmp_path / "net", **SD15_NET))
    assert hand_built(sd, net).components["controlnet"] is net
    hand_built(sd, MultiControlNetModel([net, net]))


def test_an_sdxl_controlnet_on_sd15_is_refused_at_build(sd: Path, tmp_path: Path) -> None:
    good = ControlNetModel.from_pretrained(tiny_controlnet(tmp_path / "good", **SD15_NET))
    sdxl = ControlNetModel.from_pretrained(tiny_controlnet(tmp_path / "sdxl", **SDXL_NET))
    for controlnet in (sdxl, MultiControlNetModel([good, sdxl])):
        with pytest.raises(PlanError) as caught:
            hand_built(sd, controlnet)
        message = str(caught.value)
        assert "prepare_control_image] controlnet: the ControlNet (SDXL, block_out_channels=(32, 64), cross_attention_dim=64)" in message
        assert "does not fit the UNet (SD 1.x/2.x, block_out_channels=(32, 64), cross_attention_dim=32)" in message


def test_a_flux_controlnet_of_another_width_is_refused_at_build(tmp_path: Path) -> None:
    repo = tiny_flux(tmp_path / "flux", double_blocks=3)
    base = Pipeline.from_pretrained(str(repo))
    transformer = FluxTransformer2DModel.from_pretrained(repo / "transformer")
    wide = FluxControlNetModel.from_pretrained(tiny_flux_controlnet(tmp_path / "net", joint_attention_dim=48))
    blocks = flux_controlnet_blocks(flux.flux_blocks())
    with pytest.raises(PlanError, match=r"controlnet: .*joint_attention_dim=48.* does not fit the transformer"):
        Pipeline(blocks, {**base.components, "transformer": transformer, "controlnet": wide})
