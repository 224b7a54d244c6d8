"""ControlNetModel against diffusers' ControlNetModel: the same weights give the same residuals, both ways."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from diffblocks.components.denoisers import Conditioning, Control, ControlNetDenoiser, UNetDenoiser
from diffblocks.components.models.controlnet import ControlNetModel, MultiControlNetModel
from diffblocks.components.models.unet import UNet2DConditionModel
from tests.controlnet.test_controlnet import SD15_NET, SDXL_NET, tiny_controlnet


@pytest.mark.parametrize("config", [SD15_NET, SDXL_NET], ids=["sd15", "sdxl"])
def test_residuals_match_diffusers_and_save_for_it(tmp_path: Path, config: dict[str, Any]) -> None:
    import diffusers

    folder = tiny_controlnet(tmp_path / "theirs", **config)
    ref = diffusers.ControlNetModel.from_pretrained(folder).eval()
    ours = ControlNetModel.from_pretrained(folder).eval()
    batch, width = 2, config["cross_attention_dim"]
    x, text, image = torch.randn(batch, 4, 8, 8), torch.randn(batch, 7, width), torch.rand(batch, 3, 16, 16)
    added = {"text_embeds": torch.randn(batch, 32), "time_ids": torch.randn(batch, 6)} if "addition_embed_type" in config else None
    with torch.no_grad():
        down, mid = ref(x, torch.tensor(300), text, image, conditioning_scale=0.5, added_cond_kwargs=added, return_dict=False)
        got = ours(x, torch.tensor(300), text, image, conditioning_scale=0.5, added_cond_kwargs=added)
    assert len(got) == len(down) + 1
    for a, b in zip(got, [*down, mid], strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    ours.save_pretrained(tmp_path / "ours")
    again = diffusers.ControlNetModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(again(x, torch.tensor(300), text, image, added_cond_kwargs=added, return_dict=False)[1],
                           ref(x, torch.tensor(300), text, image, added_cond_kwargs=added, return_dict=False)[1])  # fmt: skip


def test_unsupported_config_is_refused() -> None:
    with pytest.raises(ValueError, match="global_pool_conditions"):
        ControlNetModel.from_config({**SD15_NET, "global_pool_conditions": True})


def test_a_new_controlnet_leaves_the_unet_unchanged() -> None:
    unet = UNet2DConditionModel.from_config({**SD15_NET, "block_out_channels": (32, 64), "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"), "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}).eval()  # fmt: skip
    net = ControlNetModel.from_config({**SD15_NET, "block_out_channels": (32, 64), "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"), "conditioning_embedding_out_channels": (16, 32)}).eval()  # fmt: skip
    plain = UNetDenoiser(unet)
    controlled = ControlNetDenoiser(plain, [Control(net, torch.rand(1, 3, 16, 16))])
    x, c = torch.randn(2, 4, 8, 8), Conditioning(torch.randn(2, 5, 32))
    with torch.no_grad():  # zero convolutions: zero residuals; the image (batch 1) is tiled to the batch of 2
        assert torch.equal(controlled(x, torch.tensor(10), c), plain(x, torch.tensor(10), c))
    with pytest.raises(ValueError, match="has batch 2 but the denoiser input has batch 3"):
        ControlNetDenoiser(plain, [Control(net, torch.rand(2, 3, 16, 16))])(torch.randn(3, 4, 8, 8), torch.tensor(1), Conditioning(torch.randn(3, 5, 32)))


def test_multi_controlnet_needs_two_nets() -> None:
    net = ControlNetModel.from_config({**SD15_NET, "block_out_channels": (32, 64), "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"), "conditioning_embedding_out_channels": (16, 32)})  # fmt: skip
    assert list(MultiControlNetModel([net, net])) == [net, net]
    with pytest.raises(ValueError, match="two or more"):
        MultiControlNetModel([net])
