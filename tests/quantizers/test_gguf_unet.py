"""GGUF UNets: files in the original checkpoint keys (LDM for SD 1.x, SGM for SDXL) and in diffusers' keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("gguf")

from diffusers import GGUFQuantizationConfig  # noqa: E402
from diffusers import UNet2DConditionModel as DiffusersUNet  # noqa: E402

from diffblocks.components.models.gguf import load_gguf  # noqa: E402
from diffblocks.components.models.loading import CheckpointError  # noqa: E402
from diffblocks.components.models.single_file import LDM, SGM  # noqa: E402
from diffblocks.components.models.unet import UNet2DConditionModel  # noqa: E402
from diffblocks.components.quantizers import GGUFLinear, GGUFQuantizer  # noqa: E402
from tests.models.single_file_fixtures import original_state  # noqa: E402
from tests.quantizers.gguf_files import stored, write_gguf  # noqa: E402

# rows of 64: Q8_0 and Q4_0 blocks (32) fit the attention and MLP weights
SD1: dict[str, Any] = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "block_out_channels": (32, 64), "layers_per_block": 1,
    "cross_attention_dim": 64, "attention_head_dim": 8, "norm_num_groups": 8,
}
SDXL: dict[str, Any] = {
    **SD1, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"), "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2), "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 64 + 6 * 8, "attention_head_dim": (2, 4),
}


def _inputs(config: dict[str, Any]) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    inputs: dict[str, Any] = {"sample": torch.randn(1, 4, 8, 8, generator=g), "timestep": torch.tensor(500.0),
                              "encoder_hidden_states": torch.randn(1, 6, 64, generator=g)}
    if config.get("addition_embed_type") == "text_time":
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 64, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
    return inputs


def _run(model: torch.nn.Module, config: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, DiffusersUNet):
            return model(**_inputs(config), return_dict=False)[0]
        out = model(**_inputs(config))
        return out if isinstance(out, torch.Tensor) else out.sample


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def reference(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[DiffusersUNet, Path, Any]:
    config, layout = (SD1, LDM) if request.param == "sd1" else (SDXL, SGM)
    torch.manual_seed(0)
    model = DiffusersUNet(**config).eval()
    folder = tmp_path_factory.mktemp(f"unet_{request.param}")
    model.save_pretrained(folder)
    return model, folder, layout


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0"])
def test_original_layout_loads_as_diffusers_layout_does(reference: tuple[DiffusersUNet, Path, Any], tmp_path: Path, type_name: str, prefix: str) -> None:
    model, _, layout = reference
    config = dict(model.config)
    state = {k: v for k, v in model.state_dict().items()}
    original = original_state(layout.parts[0], prefix, state, config)
    a = load_gguf(write_gguf(tmp_path / "diffusers.gguf", stored(state, type_name)), UNet2DConditionModel, config=config,
                  quantizer=GGUFQuantizer("float32"))
    b = load_gguf(write_gguf(tmp_path / "original.gguf", stored(original, type_name)), UNet2DConditionModel, config=config,
                  quantizer=GGUFQuantizer("float32"))
    assert isinstance(b.down_blocks[1 if config["down_block_types"][0] == "DownBlock2D" else 0].attentions[0].transformer_blocks[0].attn1.to_q, GGUFLinear)
    out = _run(b, config)
    assert torch.equal(_run(a, config), out)
    assert not torch.equal(out, _run(model, config))  # the quantization is real


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0"])
def test_original_layout_matches_diffusers_gguf_single_file(reference: tuple[DiffusersUNet, Path, Any], tmp_path: Path, type_name: str) -> None:
    model, folder, layout = reference
    config = dict(model.config)
    # diffusers finds a UNet only under the full checkpoint's prefix
    original = original_state(layout.parts[0], "model.diffusion_model.", model.state_dict(), config)
    path = write_gguf(tmp_path / "unet.gguf", stored(original, type_name))
    ours = load_gguf(path, UNet2DConditionModel, config=config, quantizer=GGUFQuantizer("float32"))
    theirs = DiffusersUNet.from_single_file(
        str(path), config=str(folder), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        torch_dtype=torch.float32,
    )
    a, b = _run(ours, config), _run(theirs, config)
    # diffusers multiplies the float16 block scales in float16, we in float32 (as ggml): float16 rounding apart
    torch.testing.assert_close(a, b, rtol=4e-3, atol=4e-3 * b.abs().max().item())


def test_keys_of_no_known_layout_name_the_closest(reference: tuple[DiffusersUNet, Path, Any], tmp_path: Path) -> None:
    model, _, _ = reference
    state = {f"unknown.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"UNet2DConditionModel.*input_blocks\.0\.0\.weight"):
        load_gguf(write_gguf(tmp_path / "odd.gguf", stored(state, "Q8_0")), UNet2DConditionModel, config=dict(model.config))


def test_a_diffusers_layout_file_missing_a_tensor_lists_it(reference: tuple[DiffusersUNet, Path, Any], tmp_path: Path) -> None:
    model, _, _ = reference
    state = {k: v for k, v in model.state_dict().items() if k != "conv_in.bias"}
    with pytest.raises(CheckpointError, match=r"missing tensors: conv_in\.bias \(1 in all\)"):
        load_gguf(write_gguf(tmp_path / "short.gguf", stored(state, "Q8_0")), UNet2DConditionModel, config=dict(model.config))


def test_an_original_layout_tensor_of_the_wrong_shape_is_named(reference: tuple[DiffusersUNet, Path, Any], tmp_path: Path) -> None:
    model, _, layout = reference
    original = original_state(layout.parts[0], "", model.state_dict(), dict(model.config))
    original["out.2.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"tensor 'out\.2\.bias' in .* has shape \(3,\), but UNet2DConditionModel needs \(4,\) \(for conv_out\.bias\)"):
        load_gguf(write_gguf(tmp_path / "bad.gguf", stored(original, "Q8_0")), UNet2DConditionModel, config=dict(model.config))
