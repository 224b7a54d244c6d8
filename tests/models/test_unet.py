"""UNet2DConditionModel: parity with diffusers on tiny SD1.5-, SDXL- and inpainting-style configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel as RefUNet
from torch import Tensor

from diffblocks.components.models.layers import attention as attention_layers
from diffblocks.components.models.unet import UNet2DConditionModel, UNet2DConditionParams

SD15: dict[str, Any] = {
    "sample_size": 16,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
}
SDXL: dict[str, Any] = {
    "sample_size": 16,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": (2, 4),
    "transformer_layers_per_block": (1, 2),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24 + 6 * 8,  # pooled text (24) + six size ids
}
INPAINT: dict[str, Any] = {**SD15, "in_channels": 9}
TOL = 1e-5  # float32 rounding; the measured difference is 0 for every config below


def _pair(config: dict[str, Any], tmp_path: Path) -> tuple[RefUNet, UNet2DConditionModel]:
    """A randomly initialised diffusers UNet and ours loaded from its saved folder."""
    torch.manual_seed(0)
    ref = RefUNet(**config).eval()
    ref.save_pretrained(tmp_path / "unet")
    return ref, UNet2DConditionModel.from_pretrained(tmp_path / "unet")


def _inputs(batch: int = 2, channels: int = 4, size: tuple[int, int] = (16, 16)) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, channels, *size, generator=g)
    return sample, torch.tensor([10, 500]), torch.randn(batch, 7, 32, generator=g)


def _sdxl_cond(batch: int = 2) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(2)
    return {
        "text_embeds": torch.randn(batch, 24, generator=g),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch),
    }


@torch.no_grad()
def _max_diff(ref: RefUNet, ours: UNet2DConditionModel, *args: Any, **kwargs: Any) -> float:
    expected = ref(*args, **kwargs).sample
    got = ours(*args, **kwargs)
    assert got.shape == expected.shape
    return (got - expected).abs().max().item()


@pytest.mark.parametrize(("name", "config"), [("sd15", SD15), ("inpaint", INPAINT)])
def test_sd15_style_parity(name: str, config: dict[str, Any], tmp_path: Path) -> None:
    ref, ours = _pair(config, tmp_path)
    assert set(ours.state_dict()) == set(ref.state_dict())
    sample, t, ctx = _inputs(channels=config.get("in_channels", 4))
    diff = _max_diff(ref, ours, sample, t, ctx)
    print(f"{name} UNet max abs diff: {diff:.3g}")
    assert diff <= TOL


def test_sdxl_style_parity_with_text_time(tmp_path: Path) -> None:
    ref, ours = _pair(SDXL, tmp_path)
    assert ours.add_embedding is not None and ours.down_blocks[1].attentions[0].use_linear_projection
    sample, t, ctx = _inputs()
    diff = _max_diff(ref, ours, sample, t, ctx, added_cond_kwargs=_sdxl_cond())
    print(f"sdxl UNet max abs diff: {diff:.3g}")
    assert diff <= TOL
    with pytest.raises(ValueError, match="text_embeds"):
        ours(sample, t, ctx)


def test_timestep_forms_mask_odd_sizes_and_controlnet_residuals(tmp_path: Path) -> None:
    ref, ours = _pair(SD15, tmp_path)
    sample, _, ctx = _inputs(batch=2, size=(6, 10))
    with torch.no_grad():
        by_int = ours(sample, 7, ctx)
        for t in (7.0, torch.tensor(7), torch.tensor([7, 7])):
            assert torch.equal(ours(sample, t, ctx), by_int)
    assert _max_diff(ref, ours, sample, 7.5, ctx) <= TOL
    odd, _, _ = _inputs(batch=2, size=(5, 7))  # not divisible by 2**stages: upsampling follows the skips' sizes
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    assert _max_diff(ref, ours, odd, 3, ctx, encoder_attention_mask=mask) <= TOL
    with torch.no_grad():
        assert not torch.equal(ours(odd, 3, ctx, encoder_attention_mask=mask)[0], ours(odd, 3, ctx)[0])
        skips = [torch.full_like(s, 0.1) for s in _skip_shapes(ours, sample, ctx)]
    mid = torch.full((2, 64, 3, 5), 0.2)
    diff = _max_diff(
        ref, ours, sample, 3, ctx, down_block_additional_residuals=skips, mid_block_additional_residual=mid
    )
    assert diff <= TOL


@torch.no_grad()
def _skip_shapes(unet: UNet2DConditionModel, sample: Tensor, ctx: Tensor) -> list[Tensor]:
    emb = torch.zeros(sample.shape[0], unet.params.time_embed_dim)
    h = unet.conv_in(sample)
    skips = [h]
    for down in unet.down_blocks:
        h, res = down(h, emb, ctx)
        skips += res
    return skips


def test_module_paths_and_keys_match_diffusers() -> None:
    torch.manual_seed(0)
    ref = RefUNet(**SDXL)
    ours = UNet2DConditionModel.from_config(ref.config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ours_modules = dict(ours.named_modules())
    paths = (
        "mid_block.attentions.0.transformer_blocks.0.attn1",
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2",
        "up_blocks.0.resnets.1.time_emb_proj",
        "add_embedding.linear_1",
    )
    for path in paths:
        assert path in ours_modules, path
        assert type(ours_modules[path]).__name__ in {"Attention", "Linear"}


def test_all_attention_goes_through_the_seam(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []

    def reference(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, **_: Any) -> Tensor:
        calls.append(tuple(q.shape))
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        return (scores + (0 if mask is None else mask)).softmax(-1) @ v

    def forbidden(*args: Any, **kwargs: Any) -> Tensor:
        raise AssertionError("a model called scaled_dot_product_attention directly")

    monkeypatch.setattr(attention_layers, "attention", reference)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", forbidden)
    unet = UNet2DConditionModel.from_config(SD15)
    sample, t, ctx = _inputs()
    with torch.no_grad():
        unet(sample, t, ctx)
    # down (1 transformer) + mid (1) + up (2), each with self- and cross-attention
    assert len(calls) == 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load_and_forward(dtype: torch.dtype, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = RefUNet(**SD15).eval()
    ref.save_pretrained(tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path, dtype=dtype)
    assert {p.dtype for p in ours.parameters()} == {dtype}
    sample, t, ctx = _inputs(batch=1, size=(8, 8))
    t = t[:1]
    with torch.no_grad():
        got = ours(sample.to(dtype), t, ctx.to(dtype))
        expected = ref.to(dtype)(sample.to(dtype), t, ctx.to(dtype)).sample
    assert got.dtype == dtype
    print(f"{dtype} UNet max abs diff: {(got.float() - expected.float()).abs().max().item():.3g}")
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


def test_config_round_trip_and_errors() -> None:
    torch.manual_seed(0)
    ref = RefUNet(**SDXL)
    ours = UNet2DConditionModel.from_config(ref.config)
    config = ours.to_config()
    assert config["_class_name"] == "UNet2DConditionModel"
    again = RefUNet.from_config(config)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert UNet2DConditionModel.from_config(config).params == ours.params
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        UNet2DConditionModel.from_config({**SD15, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="attention_head_dim 3 .* does not divide block_out_channels\\[0\\] 32"):
        UNet2DConditionParams(**{**SD15, "attention_head_dim": 3})
    with pytest.raises(ValueError, match="needs addition_time_embed_dim"):
        UNet2DConditionParams(**{**SD15, "addition_embed_type": "text_time"})
    with pytest.raises(ValueError, match="up_block_types has 1 entries"):
        UNet2DConditionParams(**{**SD15, "up_block_types": ("UpBlock2D",)})
