"""torchao, quanto and bitsandbytes on our models against diffusers applying the same backend to the same weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel as DiffusersFlux

from diffblocks.components.models.flux import FluxTransformer2DModel
from diffblocks.components.quantizers import (
    QUANTIZERS,
    AbstractQuantizer,
    BitsAndBytesQuantizer,
    GGUFQuantizer,
    QuantizerNotInstalledError,
    QuantoQuantizer,
    TorchAoQuantizer,
    UnsupportedQuantizationError,
    quantize,
    quantizer_from_config,
    quantizer_from_diffusers,
    quantizer_of,
)

CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)
# bitsandbytes packs 4-bit weights in blocks of 64 along the rows, so its model is wider
WIDE = {**CONFIG, "attention_head_dim": 64, "joint_attention_dim": 128, "pooled_projection_dim": 128, "axes_dims_rope": (16, 24, 24)}


def _inputs(width: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 16, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, width, generator=g),
        "pooled_projections": torch.randn(1, width, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
    }


def _run(model: torch.nn.Module, width: int = 32) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, DiffusersFlux):
            return model(**_inputs(width), return_dict=False)[0]
        return model(**_inputs(width))


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("flux_float")
    DiffusersFlux(**CONFIG).save_pretrained(folder)
    return folder


def _diffusers_config(quantizer: AbstractQuantizer) -> Any:
    from diffusers import QuantoConfig, TorchAoConfig

    if isinstance(quantizer, TorchAoQuantizer):
        return TorchAoConfig(quantizer.torchao_config())
    assert isinstance(quantizer, QuantoQuantizer)
    return QuantoConfig(weights_dtype=quantizer.weights)


CPU_CASES = [
    TorchAoQuantizer("int8wo"),
    TorchAoQuantizer("int8dq"),
    TorchAoQuantizer("float8wo"),
    QuantoQuantizer("int8"),
    QuantoQuantizer("int4"),
    QuantoQuantizer("float8"),
]


@pytest.mark.filterwarnings("ignore:.*torch_dtype.*")
@pytest.mark.parametrize("quantizer", CPU_CASES, ids=lambda q: q.describe())
def test_quantized_model_matches_diffusers_and_saves_in_its_layout(float_folder: Path, tmp_path: Path, quantizer: AbstractQuantizer) -> None:
    ours = FluxTransformer2DModel.from_pretrained(float_folder, quantizer=quantizer)
    theirs = DiffusersFlux.from_pretrained(float_folder, quantization_config=_diffusers_config(quantizer), torch_dtype=torch.float32)
    out = _run(ours)
    torch.testing.assert_close(out, _run(theirs), rtol=0, atol=1e-6)
    assert not torch.allclose(out, _run(FluxTransformer2DModel.from_pretrained(float_folder)), atol=1e-4)
    assert quantizer_of(ours) == quantizer

    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((tmp_path / "theirs" / "config.json").read_text())["quantization_config"]
    back = FluxTransformer2DModel.from_pretrained(tmp_path / "ours")  # no quantizer: the folder says which
    assert quantizer_of(back) == quantizer and torch.equal(_run(back), out)
    from_diffusers = FluxTransformer2DModel.from_pretrained(tmp_path / "theirs")
    assert torch.equal(_run(from_diffusers), out)
    # diffusers reads our folder as it reads its own
    theirs_back = DiffusersFlux.from_pretrained(tmp_path / "theirs", torch_dtype=torch.float32).eval()
    ours_in_diffusers = DiffusersFlux.from_pretrained(tmp_path / "ours", torch_dtype=torch.float32).eval()
    assert torch.equal(_run(ours_in_diffusers), _run(theirs_back))


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_bitsandbytes_layers_hold_what_bitsandbytes_makes_and_reload(tmp_path: Path, kind: str) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    DiffusersFlux(**WIDE).save_pretrained(tmp_path / "float")
    floats = FluxTransformer2DModel.from_pretrained(tmp_path / "float")
    ours = FluxTransformer2DModel.from_pretrained(tmp_path / "float", quantizer=BitsAndBytesQuantizer(kind))
    layer, weight = ours.transformer_blocks[0].attn.to_q, floats.transformer_blocks[0].attn.to_q.weight
    if kind == "int8":
        assert isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.int8
        expected = bnb.functional.int8_vectorwise_quant(weight.data.half())[0]
        assert torch.equal(layer.weight.data, expected)
    else:
        assert isinstance(layer, bnb.nn.Linear4bit)
        expected = bnb.functional.quantize_4bit(weight.data, quant_type=kind)[0]
        assert torch.equal(layer.weight.data.flatten(), expected.flatten())
    out = _run(ours, 128)
    assert not torch.allclose(out, _run(floats, 128), atol=1e-4)
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    back = FluxTransformer2DModel.from_pretrained(tmp_path / "ours")
    assert quantizer_of(back) == BitsAndBytesQuantizer(kind) and torch.equal(_run(back, 128), out)


@pytest.mark.parametrize("quantizer", [*CPU_CASES, TorchAoQuantizer("int4wo"), TorchAoQuantizer("float8dq"),
                                       GGUFQuantizer("float16"), BitsAndBytesQuantizer("nf4", double_quant=True),
                                       BitsAndBytesQuantizer("int8", modules_to_not_convert=("proj_out",))],
                         ids=lambda q: q.describe())
def test_every_quantizer_round_trips_through_json_and_diffusers_config(quantizer: AbstractQuantizer) -> None:
    assert quantizer_from_config(json.loads(json.dumps(quantizer.to_config()))) == quantizer
    assert AbstractQuantizer.from_config(quantizer.to_config()) == quantizer
    assert quantizer_from_diffusers(json.loads(json.dumps(quantizer.to_diffusers()))) == quantizer
    assert type(quantizer).__name__ in QUANTIZERS


def test_spellings_name_one_type() -> None:
    assert TorchAoQuantizer("int8_weight_only") == TorchAoQuantizer("int8wo") == TorchAoQuantizer(quant_type="Int8WeightOnlyConfig")
    assert TorchAoQuantizer("float8_dynamic_activation_float8_weight").quant_type == "float8dq"
    assert QuantoQuantizer("qint4") == QuantoQuantizer("int4") == QuantoQuantizer(weights="int4")
    assert GGUFQuantizer(torch.bfloat16) == GGUFQuantizer("bfloat16") == GGUFQuantizer()
    with pytest.raises(ValueError, match="unknown torchao quant type 'int3wo'; known: "):
        TorchAoQuantizer("int3wo")
    with pytest.raises(ValueError, match="quant_method 'awq', which diffblocks does not read; it reads: bitsandbytes, gguf"):
        quantizer_from_diffusers({"quant_method": "awq"})
    with pytest.raises(ValueError, match="Unknown quantizer 'Nope'; known quantizers: "):
        quantizer_from_config({"_class_name": "Nope"})


def test_missing_backend_fails_with_install_hint_before_any_weight_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)  # importing it now raises ImportError
    with pytest.raises(QuantizerNotInstalledError, match=r"needs the Python package 'torchao'.*pip install"):
        # the folder does not exist: the check comes before anything is read
        FluxTransformer2DModel.from_pretrained(tmp_path / "absent", quantizer=TorchAoQuantizer("int8wo"))
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)
    with pytest.raises(QuantizerNotInstalledError, match="optimum-quanto"):
        quantize(torch.nn.Linear(4, 4), QuantoQuantizer())


def test_quant_type_the_device_cannot_run_is_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedQuantizationError, match=r"float8dq.*cannot run on cpu.*compute capability 8\.9"):
        FluxTransformer2DModel.from_pretrained(tmp_path / "absent", quantizer=TorchAoQuantizer("float8dq"))
    with pytest.raises(UnsupportedQuantizationError, match="int4 weight-only kernels need a CUDA GPU"):
        FluxTransformer2DModel.from_pretrained(tmp_path / "absent", quantizer=TorchAoQuantizer("int4wo"))
    with pytest.raises(UnsupportedQuantizationError, match="bitsandbytes runs on CUDA GPUs"):
        BitsAndBytesQuantizer().check("meta")


def test_quantizing_twice_or_nothing_is_refused(float_folder: Path) -> None:
    model = FluxTransformer2DModel.from_pretrained(float_folder, quantizer=TorchAoQuantizer("int8wo"))
    with pytest.raises(ValueError, match="already quantized with TorchAoQuantizer.*Quantize the original weights"):
        quantize(model, QuantoQuantizer())
    with pytest.raises(ValueError, match="holds no weights"):
        quantize(torch.nn.ReLU(), TorchAoQuantizer("int8wo"))


def test_a_folder_saved_quantized_refuses_another_quantizer(float_folder: Path, tmp_path: Path) -> None:
    FluxTransformer2DModel.from_pretrained(float_folder, quantizer=QuantoQuantizer("int8")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="already quantized with QuantoQuantizer.*cannot be quantized again"):
        FluxTransformer2DModel.from_pretrained(tmp_path, quantizer=TorchAoQuantizer("int8wo"))
    assert quantizer_of(FluxTransformer2DModel.from_pretrained(tmp_path, quantizer=QuantoQuantizer("qint8"))) is not None


def test_saved_tensors_the_quantized_model_has_no_place_for_are_named(float_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    FluxTransformer2DModel.from_pretrained(float_folder, quantizer=QuantoQuantizer("int8")).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["lora_A.weight"] = torch.zeros(2, 2)
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"QuantoQuantizer\(\) has no place for: lora_A\.weight"):
        FluxTransformer2DModel.from_pretrained(tmp_path)


def test_a_spec_carries_its_quantizer_through_the_index() -> None:
    from diffblocks.components import ComponentSpec

    quantizer = TorchAoQuantizer("int8wo")
    spec = ComponentSpec(name="unet", type_hint=("diffusers", "UNet2DConditionModel"), repo="org/model", subfolder="unet",
                         quantization=quantizer.to_config())
    back = ComponentSpec.from_index_entry("unet", json.loads(json.dumps(spec.to_index_entry())))
    assert back == spec and AbstractQuantizer.from_config(back.quantization or {}) == quantizer
    assert back.load_id != spec.with_(quantization=None).load_id  # quantized and float weights are two objects
