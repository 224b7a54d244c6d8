"""GGUF: our dequantization against ggml's reference, files loaded against diffusers' GGUF path, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

import gguf  # noqa: E402
from diffusers import FluxTransformer2DModel as DiffusersFlux  # noqa: E402
from diffusers import GGUFQuantizationConfig  # noqa: E402

from diffblocks.components.models.flux import FluxTransformer2DModel  # noqa: E402
from diffblocks.components.models.loading import CheckpointError  # noqa: E402
from diffblocks.components.models.gguf import load_gguf, read_gguf  # noqa: E402
from diffblocks.components.quantizers import GGUFLinear, GGUFQuantizer, quantize, quantizer_of  # noqa: E402
from diffblocks.components.quantizers.gguf_kernels import BLOCK_TYPES, dequantize  # noqa: E402
from tests.quantizers.gguf_files import K_QUANTS, stored, to_bfl, write_gguf  # noqa: E402

# inner width 256: every K-quant (blocks of 256) fits the attention and MLP rows
CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=2,
    joint_attention_dim=256, pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", *K_QUANTS, "F16", "F32")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[DiffusersFlux, Path]:
    torch.manual_seed(0)
    model = DiffusersFlux(**CONFIG).eval()
    folder = tmp_path_factory.mktemp("flux_float")
    model.save_pretrained(folder)
    return model, folder


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 16, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, 256, generator=g),
        "pooled_projections": torch.randn(1, 256, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
    }


@pytest.mark.parametrize("type_name", list(BLOCK_TYPES))
def test_dequantization_equals_ggml_reference_bit_for_bit(type_name: str) -> None:
    kind = BLOCK_TYPES[type_name]
    raw = np.random.default_rng(0).integers(0, 256, size=(5, 2 * kind.type_size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).astype(np.float32)
    ours = dequantize(torch.from_numpy(raw.copy()), type_name, (5, 2 * kind.block_size)).numpy()
    finite = np.isfinite(expected)  # random bytes make some float16 scales inf or nan
    assert np.array_equal(np.isfinite(ours), finite)
    assert np.array_equal(ours[finite], expected[finite])


@pytest.mark.parametrize("type_name", TYPES)
def test_gguf_file_matches_diffusers_gguf_loading(reference: tuple[DiffusersFlux, Path], tmp_path: Path, type_name: str) -> None:
    model, folder = reference
    path = write_gguf(tmp_path / "flux.gguf", stored(model.state_dict(), type_name))
    ours = load_gguf(path, FluxTransformer2DModel, config=model.config, quantizer=GGUFQuantizer(torch.float32))
    theirs = DiffusersFlux.from_single_file(
        str(path), config=str(folder), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        torch_dtype=torch.float32,
    )
    with torch.no_grad():
        a, b = ours(**_inputs()), theirs(**_inputs(), return_dict=False)[0]
        floats = model(**_inputs(), return_dict=False)[0]
    # diffusers multiplies the float16 block scales in float16; we follow ggml (float32), so the two differ
    # by float16 rounding of the weights and no more
    torch.testing.assert_close(a, b, rtol=4e-3, atol=4e-3 * b.abs().max().item())
    assert quantizer_of(ours) == GGUFQuantizer("float32")
    if type_name in BLOCK_TYPES:
        layer = ours.transformer_blocks[0].attn.to_q
        assert isinstance(layer, GGUFLinear) and layer.weight.dtype == torch.uint8
        assert not torch.equal(a, floats)  # the quantization is real
        assert ours.memory_bytes() < 0.45 * sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K", "Q6_K"])
def test_black_forest_labs_layout_loads_to_the_same_model(reference: tuple[DiffusersFlux, Path], tmp_path: Path, type_name: str) -> None:
    model, _ = reference
    tensors = stored(model.state_dict(), type_name)
    diffusers_layout = write_gguf(tmp_path / "diffusers.gguf", tensors)
    bfl_layout = write_gguf(tmp_path / "bfl.gguf", to_bfl(tensors))
    a = load_gguf(diffusers_layout, FluxTransformer2DModel, config=model.config, quantizer=GGUFQuantizer("float32"))
    b = load_gguf(bfl_layout, FluxTransformer2DModel, config=model.config, quantizer=GGUFQuantizer("float32"))
    assert isinstance(b.single_transformer_blocks[0].proj_mlp, GGUFLinear)  # split from linear1, still quantized
    with torch.no_grad():
        assert torch.equal(a(**_inputs()), b(**_inputs()))


def test_bfloat16_compute_is_the_default(reference: tuple[DiffusersFlux, Path], tmp_path: Path) -> None:
    model, _ = reference
    path = write_gguf(tmp_path / "flux.gguf", stored(model.state_dict(), "Q8_0"))
    ours = load_gguf(path, FluxTransformer2DModel, config=model.config)
    inputs = {k: v.to(torch.bfloat16) for k, v in _inputs().items()}
    with torch.no_grad():
        assert ours(**inputs).dtype == torch.bfloat16


def _small_file(tmp_path: Path) -> Path:
    weight = gguf.quants.quantize(np.ones((8, 64), np.float32), gguf.GGMLQuantizationType.Q8_0)
    return write_gguf(tmp_path / "small.gguf", {"a.weight": ("Q8_0", weight), "a.bias": ("F32", np.zeros(8, np.float32))})


def _set_type(path: Path, name: bytes, type_id: int) -> Path:
    raw = path.read_bytes()
    at = raw.index(name) + len(name) + 4 + 8 * 2  # name, n_dims (u32), two u64 dims, then the type (u32)
    out = path.with_name(f"type{type_id}.gguf")
    out.write_bytes(raw[:at] + type_id.to_bytes(4, "little") + raw[at + 4 :])
    return out


def test_truncated_file_is_named_corrupt(tmp_path: Path) -> None:
    path = _small_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_gguf(path)


def test_garbage_file_is_named_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 200)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_gguf(path)


def test_unknown_type_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="unknown GGUF type"):
        read_gguf(_set_type(_small_file(tmp_path), b"a.weight", 99))


def test_type_we_cannot_dequantize_names_the_tensor(tmp_path: Path) -> None:
    iq4_nl = gguf.GGMLQuantizationType.IQ4_NL.value  # 32 weights in 18 bytes, like Q4_0
    with pytest.raises(CheckpointError, match=r"tensor 'a\.weight' .* IQ4_NL, which diffblocks cannot dequantize"):
        read_gguf(_set_type(_small_file(tmp_path), b"a.weight", iq4_nl))


def test_tensor_of_wrong_shape_is_named(reference: tuple[DiffusersFlux, Path], tmp_path: Path) -> None:
    model, _ = reference
    tensors = to_bfl(stored(model.state_dict(), "Q8_0"))
    kind, qkv = tensors["double_blocks.0.img_attn.qkv.weight"]
    tensors["double_blocks.0.img_attn.qkv.weight"] = (kind, qkv[:-32])
    path = write_gguf(tmp_path / "bad.gguf", tensors)
    with pytest.raises(CheckpointError, match=r"tensor 'double_blocks\.0\.img_attn\.qkv\.weight' .* has shape \(736, 256\)"):
        load_gguf(path, FluxTransformer2DModel, config=model.config)
    tensors = stored(model.state_dict(), "Q8_0")
    tensors["proj_out.weight"] = tensors["x_embedder.weight"]
    path = write_gguf(tmp_path / "bad2.gguf", tensors)
    with pytest.raises(CheckpointError, match=r"tensor 'proj_out\.weight' .* has shape \(256, 64\), but FluxTransformer2DModel needs \(64, 256\)"):
        load_gguf(path, FluxTransformer2DModel, config=model.config)


def test_missing_and_extra_tensors_are_listed(reference: tuple[DiffusersFlux, Path], tmp_path: Path) -> None:
    model, _ = reference
    tensors = stored(model.state_dict(), "Q8_0")
    del tensors["proj_out.weight"]
    tensors["lora_up.weight"] = tensors["proj_out.bias"]
    path = write_gguf(tmp_path / "bad.gguf", tensors)
    with pytest.raises(CheckpointError, match=r"missing tensors: proj_out\.weight(.|\n)*no place for: lora_up\.weight"):
        load_gguf(path, FluxTransformer2DModel, config=model.config)


def test_gguf_quantizes_nothing_itself_and_is_not_saved(reference: tuple[DiffusersFlux, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="load_gguf"):
        quantize(torch.nn.Linear(4, 4), GGUFQuantizer())
    model, _ = reference
    ours = load_gguf(write_gguf(tmp_path / "f.gguf", stored(model.state_dict(), "Q8_0")), FluxTransformer2DModel, config=model.config)
    with pytest.raises(ValueError, match="keep the .gguf file"):
        ours.save_pretrained(tmp_path / "saved")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_a_gguf_layer_cast_to_another_dtype_computes_in_it(bias: bool) -> None:
    # model.half() / .to(dtype) reaches a GGUF layer: its weight stays in its blocks, and it now
    # dequantizes to (and adds its bias in) the new dtype, like every other layer of the model
    kind = BLOCK_TYPES["Q8_0"]
    data = torch.randint(0, 255, (4, 64 // kind.block_size * kind.type_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data.view(-1, kind.type_size)[:, :2] = torch.tensor([0, 60], dtype=torch.uint8)  # a small finite float16 scale per block
    layer = GGUFLinear(64, 4, type_name="Q8_0", data=data, bias=torch.ones(4) if bias else None, compute_dtype=torch.bfloat16)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    reference = torch.nn.functional.linear(x.half(), layer.dequantized_weight().float().half(), torch.ones(4).half() if bias else None)
    layer.half()
    assert torch.equal(layer.weight, data) and layer.compute_dtype == torch.float16
    out = layer(x.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, reference, atol=1e-2, rtol=1e-3)
