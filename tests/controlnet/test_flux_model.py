"""FluxControlNetModel against diffusers' FluxControlNetModel: the same weights give the same residuals, both ways."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from diffblocks.components.models.controlnet import (
    FluxControlNetModel,
    FluxControlNetParams,
    FluxMultiControlNetModel,
    flux_block_residuals,
)
from diffblocks.components.models.flux import prepare_image_ids, prepare_text_ids
from tests.controlnet.flux_fixtures import FLUX_NET, tiny_flux_controlnet

KINDS = {
    "instantx": {},
    "union": {"num_mode": 3},
    "xlabs": {"conditioning_embedding_channels": 16, "patch_size": 2, "num_single_layers": 0},
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_residuals_match_diffusers_and_save_for_it(tmp_path: Path, kind: str) -> None:
    import diffusers

    folder = tiny_flux_controlnet(tmp_path / "theirs", **KINDS[kind])
    ref = diffusers.FluxControlNetModel.from_pretrained(folder).eval()
    ours = FluxControlNetModel.from_pretrained(folder).eval()
    batch, rows, cols = 2, 2, 3
    x, text = torch.randn(batch, rows * cols, 64), torch.randn(batch, 5, 32)
    cond = torch.rand(batch, 3, 16 * rows, 16 * cols) * 2 - 1 if kind == "xlabs" else torch.randn(batch, rows * cols, 64)
    mode = torch.tensor([[2], [0]]) if kind == "union" else None
    args: dict[str, Any] = dict(encoder_hidden_states=text, pooled_projections=torch.randn(batch, 32), timestep=torch.tensor([0.7, 0.7]),
                                img_ids=prepare_image_ids(rows, cols), txt_ids=prepare_text_ids(5), guidance=torch.tensor([3.5, 3.5]))  # fmt: skip
    with torch.no_grad():
        double, single = ref(x, cond, controlnet_mode=mode, conditioning_scale=0.5, return_dict=False, **args)
        got = ours(x, cond, controlnet_mode=mode, conditioning_scale=0.5, **args)
    assert len(got.block_samples) == len(double) == 2
    for a, b in zip(got.block_samples, double, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    if single is None:
        assert got.single_block_samples == ()
    else:
        for a, b in zip(got.single_block_samples, single, strict=True):
            assert torch.allclose(a, b, atol=1e-6)
    assert ours.reads_latents == (kind != "xlabs") and ours.repeats_blocks == (kind == "xlabs")
    ours.save_pretrained(tmp_path / "ours")
    again = diffusers.FluxControlNetModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(again(x, cond, controlnet_mode=mode, return_dict=False, **args)[0][1],
                           ref(x, cond, controlnet_mode=mode, return_dict=False, **args)[0][1])  # fmt: skip


def test_block_residuals_follow_the_interval_rule() -> None:
    from diffblocks.components.models.controlnet import FluxControlNetOutput

    a, b, c = (torch.full((1, 1, 1), float(i)) for i in range(3))
    out = FluxControlNetOutput((a, b), (c,))
    spread = flux_block_residuals(out, num_layers=5, num_single_layers=3)
    assert [int(r) for r in spread] == [0, 0, 0, 1, 1, 2, 2, 2]  # ceil(5 / 2) = 3 blocks per residual
    cycled = flux_block_residuals(FluxControlNetOutput((a, b), ()), num_layers=5, num_single_layers=3, repeat=True)
    assert [int(r) for r in cycled] == [0, 1, 0, 1, 0]  # XLabs: cycle, and no single blocks


def test_control_modes_are_checked() -> None:
    net = FluxControlNetModel(FluxControlNetParams(**{**FLUX_NET, "num_mode": 3}))
    net.check_mode(2)
    with pytest.raises(ValueError, match=r"knows 3 control modes \(0..2\), got control_mode 3"):
        net.check_mode(3)
    with pytest.raises(ValueError, match="ControlNet-Union \\(num_mode=3\\): pass control_mode"):
        net.check_mode(None)
    plain = FluxControlNetModel(FluxControlNetParams(**FLUX_NET))
    with pytest.raises(ValueError, match="not a ControlNet-Union"):
        plain.check_mode(1)
    with pytest.raises(ValueError, match="two or more"):
        FluxMultiControlNetModel([plain])
    with pytest.raises(ValueError, match="num_mode must be >= 1"):
        FluxControlNetParams(**{**FLUX_NET, "num_mode": 0})
