"""IP-Adapter pieces against their references: the image projections, the layer table, the CLIP preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

from diffblocks.blocks.standard.ip_adapter import clip_pixels
from diffblocks.components.models.ip_adapter import MultiIPAdapterModel, cross_attention_layers, load_ip_adapter_file
from diffblocks.components.models.unet import UNet2DConditionModel
from tests.ip_adapter.ip_files import cross_attention_widths, ip_adapter_tensors


@pytest.mark.parametrize("kind", ["plain", "plus", "full"])
def test_projections_match_diffusers(sd15: tuple[Path, Path], kind: str, tmp_path: Path) -> None:
    import diffusers

    repo, _ = sd15
    tensors = ip_adapter_tensors(cross_attention_widths(repo / "unet"), kind)  # type: ignore[arg-type]
    save_file(tensors, tmp_path / "ip.safetensors")
    ours = load_ip_adapter_file(tmp_path / "ip.safetensors")
    unet = diffusers.UNet2DConditionModel.from_pretrained(repo / "unet")
    theirs = unet._convert_ip_adapter_image_proj_to_diffusers(
        {k.removeprefix("image_proj."): v for k, v in tensors.items() if k.startswith("image_proj.")}, low_cpu_mem_usage=False
    )
    features = torch.randn(3, 16) if kind == "plain" else torch.randn(3, 5, 32)
    with torch.no_grad():
        assert torch.allclose(ours.image_proj(features), theirs(features), atol=1e-6)
    assert ours.state_dict().keys() == tensors.keys()  # the file's own layout: loaded and saved as it is


def test_layer_table_is_diffusers_processor_order(sd15: tuple[Path, Path]) -> None:
    import diffusers

    repo, _ = sd15
    theirs = diffusers.UNet2DConditionModel.from_pretrained(repo / "unet")
    expected = [name.removesuffix(".processor") for name in theirs.attn_processors if name.endswith("attn2.processor")]
    ours = UNet2DConditionModel.from_pretrained(repo / "unet")
    assert [name for name, _ in cross_attention_layers(ours)] == expected
    assert expected[-1].startswith("mid_block")  # diffusers numbers the mid block last


def test_multi_needs_two() -> None:
    with pytest.raises(ValueError, match="two or more IP-Adapters"):
        MultiIPAdapterModel([])


def test_clip_pixels_match_the_clip_image_processor() -> None:
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    rng = np.random.default_rng(0)
    square = PIL.Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8"))
    expected = processor(square, return_tensors="pt").pixel_values
    assert torch.allclose(clip_pixels(square, size=32), expected, atol=1e-5)  # same size: only normalised, exactly

    smooth = np.kron(rng.random((12, 18, 3)), np.ones((8, 8, 1)))  # 96x144, resized to 32x48, cut to 32x32
    wide = PIL.Image.fromarray((smooth * 255).astype("uint8"))
    expected = processor(wide, return_tensors="pt").pixel_values
    ours = clip_pixels(wide, size=32)
    assert ours.shape == expected.shape == (1, 3, 32, 32)
    assert (ours - expected).abs().mean() < 0.01  # bicubic in torch vs PIL: close (0.005 here), not equal


def test_layer_table_of_the_released_models() -> None:
    sd15 = {"cross_attention_dim": 768}  # diffusers' defaults are SD 1.5's layout otherwise
    sdxl = dict(block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))  # fmt: skip
    with torch.device("meta"):
        small = cross_attention_layers(UNet2DConditionModel.from_config(sd15))
        large = cross_attention_layers(UNet2DConditionModel.from_config(sdxl))
    assert len(small) == 16 and small[15][0] == "mid_block.attentions.0.transformer_blocks.0.attn2"  # ip_adapter.31
    assert small[6][0] == "up_blocks.1.attentions.0.transformer_blocks.0.attn2"  # ip_adapter.13
    assert len(large) == 70 and large[24][0] == "up_blocks.0.attentions.0.transformer_blocks.0.attn2"  # ip_adapter.49
