"""ControlNetUnionModel against diffusers' ControlNetUnionModel: the same weights give the same residuals, both ways."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from diffblocks.components.models.controlnet import ControlNetUnionModel, ControlNetUnionParams
from tests.controlnet.test_controlnet import SDXL_NET

UNION = dict(num_control_type=4, num_trans_channel=32, num_trans_head=4, num_trans_layer=1, num_proj_channel=32,
             conditioning_embedding_out_channels=(16, 32))  # fmt: skip


def tiny_union(folder: Path, *, seed: int = 3) -> Path:
    """A diffusers ControlNetUnionModel shaped like the tiny SDXL UNet, with random (not zero) output layers."""
    import diffusers

    torch.manual_seed(seed)
    net = diffusers.ControlNetUnionModel(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
                                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), **SDXL_NET, **UNION)  # fmt: skip
    with torch.no_grad():
        for param in net.parameters():
            if not param.abs().sum():
                param.normal_(std=0.3)
    net.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "case",
    [dict(modes=[2], scale=0.6), dict(modes=[0, 3], scale=[0.5, 0.9]), dict(modes=[1], scale=0.7, guess_mode=True),
     dict(modes=[0, 2], scale=[0.8, 0.4], guess_mode=True)],
    ids=["one-image", "two-images", "guess-mode", "two-images-guess-mode"],
)
def test_union_residuals_match_diffusers_and_save_for_it(tmp_path: Path, case: dict[str, Any]) -> None:
    import diffusers

    folder = tiny_union(tmp_path / "theirs")
    ref = diffusers.ControlNetUnionModel.from_pretrained(folder).eval()
    ours = ControlNetUnionModel.from_pretrained(folder).eval()
    batch, modes = 2, case["modes"]
    x, text = torch.randn(batch, 4, 8, 8), torch.randn(batch, 7, 64)
    images = [torch.rand(batch, 3, 16, 16) for _ in modes]
    control_type = torch.zeros(batch, 4)
    control_type[:, modes] = 1
    added = {"text_embeds": torch.randn(batch, 32), "time_ids": torch.randn(batch, 6)}
    guess = case.get("guess_mode", False)
    with torch.no_grad():
        down, mid = ref(x, torch.tensor(300), text, images, control_type, modes, conditioning_scale=case["scale"],
                        added_cond_kwargs=added, guess_mode=guess, return_dict=False)  # fmt: skip
        got = ours(x, torch.tensor(300), text, images, control_type, modes, conditioning_scale=case["scale"],
                   added_cond_kwargs=added, guess_mode=guess)  # fmt: skip
    assert len(got) == len(down) + 1
    for a, b in zip(got, [*down, mid], strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    ours.save_pretrained(tmp_path / "ours")
    again = diffusers.ControlNetUnionModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(again(x, torch.tensor(300), text, images, control_type, modes, added_cond_kwargs=added, return_dict=False)[1],
                           ref(x, torch.tensor(300), text, images, control_type, modes, added_cond_kwargs=added, return_dict=False)[1])  # fmt: skip


def test_union_params_and_modes_are_checked() -> None:
    base = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), **SDXL_NET)
    with pytest.raises(ValueError, match=r"num_trans_channel 320 must equal block_out_channels\[0\] 32"):
        ControlNetUnionParams(**base)
    net = ControlNetUnionModel(ControlNetUnionParams(**base, **UNION)).eval()
    with pytest.raises(ValueError, match=r"knows 4 control types \(0..3\), got control_mode 4"):
        net(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 7, 64), [torch.rand(1, 3, 16, 16)], torch.zeros(1, 4), [4])
    with pytest.raises(ValueError, match="got 2 control images for 1 control modes"):
        net(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 7, 64), [torch.rand(1, 3, 16, 16)] * 2, torch.zeros(1, 4), [1])
