"""Quantized transformers text encoders (CLIP, T5) saved in transformers' layout, loaded back, and read by transformers."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedModel, T5Config, T5EncoderModel

from diffblocks.blocks import Pipeline
from diffblocks.components.quantizers import (
    BitsAndBytesQuantizer,
    QuantoQuantizer,
    TorchAoQuantizer,
    quantize,
    quantizer_of,
)
from diffblocks.components.quantizers.transformers_format import (
    load_quantized_transformers,
    quantizer_from_transformers,
    save_quantized_transformers,
    transformers_quantization_config,
)
from tests.presets.flux_fixtures import tiny_flux


def _clip() -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        projection_dim=32, bos_token_id=0, eos_token_id=2,
    )
    return CLIPTextModel(config).eval()


def _t5() -> T5EncoderModel:
    torch.manual_seed(0)
    config = T5Config(vocab_size=100, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, feed_forward_proj="gated-gelu")
    return T5EncoderModel(config).eval()


MODELS = {"clip": _clip, "t5": _t5}


def _embeddings(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids).last_hidden_state


@pytest.mark.parametrize("which", list(MODELS))
@pytest.mark.parametrize("quantizer", [TorchAoQuantizer("int8wo"), QuantoQuantizer("int8"), QuantoQuantizer("int4")], ids=str)
def test_saved_and_loaded_back_quantized_with_the_same_embeddings(which: str, quantizer: Any, tmp_path: Path) -> None:
    floats = MODELS[which]()
    model = quantize(copy.deepcopy(floats), quantizer)
    save_quantized_transformers(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == transformers_quantization_config(quantizer)
    assert (tmp_path / "model.safetensors").is_file()
    back = load_quantized_transformers(type(floats), tmp_path)
    assert quantizer_of(back) == quantizer
    assert torch.equal(_embeddings(back), _embeddings(model))
    assert (_embeddings(back) - _embeddings(floats)).abs().max() > 1e-5  # the quantization is real


def test_quantization_configs_are_transformers_own() -> None:
    import transformers
    from torchao.quantization import Int8WeightOnlyConfig

    assert transformers_quantization_config(TorchAoQuantizer("int8wo")) == transformers.TorchAoConfig(Int8WeightOnlyConfig()).to_dict()
    assert transformers_quantization_config(QuantoQuantizer("int4")) == transformers.QuantoConfig(weights="int4").to_dict()
    nf4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    ours = transformers_quantization_config(BitsAndBytesQuantizer("nf4"))
    assert {k: ours[k] for k in ("quant_method", "load_in_4bit", "bnb_4bit_quant_type", "llm_int8_threshold")} == {
        k: nf4.to_dict()[k] for k in ("quant_method", "load_in_4bit", "bnb_4bit_quant_type", "llm_int8_threshold")
    }
    for quantizer in (TorchAoQuantizer("int8dq"), QuantoQuantizer("float8"), BitsAndBytesQuantizer("int8")):
        assert quantizer_from_transformers(transformers_quantization_config(quantizer)) == quantizer


@pytest.mark.parametrize("which", list(MODELS))
def test_torchao_folders_read_by_transformers_and_transformers_folders_read_by_ours(which: str, tmp_path: Path) -> None:
    import transformers
    from torchao.quantization import Int8WeightOnlyConfig

    floats = MODELS[which]()
    ours = quantize(copy.deepcopy(floats), TorchAoQuantizer("int8wo"))
    save_quantized_transformers(ours, tmp_path / "ours")
    theirs = type(floats).from_pretrained(tmp_path / "ours").eval()
    assert torch.equal(_embeddings(theirs), _embeddings(ours))
    # what diffusers' PipelineQuantizationConfig writes for a text encoder: transformers' own save
    floats.save_pretrained(tmp_path / "float")
    config = transformers.TorchAoConfig(Int8WeightOnlyConfig())
    type(floats).from_pretrained(tmp_path / "float", quantization_config=config).save_pretrained(tmp_path / "theirs")
    back = load_quantized_transformers(type(floats), tmp_path / "theirs")
    assert quantizer_of(back) == TorchAoQuantizer("int8wo")
    assert torch.equal(_embeddings(back), _embeddings(ours))


def test_bitsandbytes_nf4_clip_round_trip_and_transformers_reads_it(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    floats = _clip()
    model = quantize(copy.deepcopy(floats), BitsAndBytesQuantizer("nf4"))
    save_quantized_transformers(model, tmp_path)
    back = load_quantized_transformers(CLIPTextModel, tmp_path)
    assert torch.equal(_embeddings(back), _embeddings(model))
    theirs = CLIPTextModel.from_pretrained(tmp_path).eval()
    # transformers reads the same nf4 blocks (it computes in its own bnb compute dtype, hence the rounding)
    assert (_embeddings(theirs) - _embeddings(model)).abs().max() < 0.1


def test_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not quantized"):
        save_quantized_transformers(_clip(), tmp_path / "plain")
    quanto = quantize(_clip(), QuantoQuantizer("int8", activations="int8"))
    with pytest.raises(ValueError, match="QuantoConfig cannot record"):
        save_quantized_transformers(quanto, tmp_path / "activations")
    assert not (tmp_path / "plain").exists() and not (tmp_path / "activations").exists()
    with pytest.raises(ValueError, match="no quantization_config"):
        _clip().save_pretrained(tmp_path / "float")
        load_quantized_transformers(CLIPTextModel, tmp_path / "float")


def test_pickled_folders_are_not_read(tmp_path: Path) -> None:
    model = quantize(_clip(), TorchAoQuantizer("int8wo"))
    save_quantized_transformers(model, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        load_quantized_transformers(CLIPTextModel, tmp_path)


# --- pipelines -------------------------------------------------------------------------------------------

KWARGS: dict[str, Any] = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, max_sequence_length=16)


def _image(pipe: Any) -> np.ndarray:
    generator = torch.Generator().manual_seed(7)
    if isinstance(pipe, Pipeline):
        return np.asarray(pipe(**KWARGS, generator=generator, output_type="np", progress=False).images)
    return np.asarray(pipe(**KWARGS, generator=generator, output_type="np").images)


@pytest.mark.parametrize("quantizer", [TorchAoQuantizer("int8wo"), QuantoQuantizer("int8")], ids=str)
def test_pipeline_with_quantized_text_encoders_saves_and_loads_the_same_image(quantizer: Any, tmp_path: Path) -> None:
    repo = tiny_flux(tmp_path / "flux")
    pipe = Pipeline.from_pretrained(str(repo), quantization=quantizer)  # the transformer and both text encoders
    image = _image(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    for name in ("text_encoder", "text_encoder_2"):
        config = json.loads((tmp_path / "saved" / name / "config.json").read_text())
        assert config["quantization_config"] == transformers_quantization_config(quantizer)
    back = Pipeline.from_pretrained(str(tmp_path / "saved"))
    assert all(quantizer_of(back.components[name]) == quantizer for name in ("transformer", "text_encoder", "text_encoder_2"))
    assert np.array_equal(_image(back), image)


@pytest.mark.filterwarnings("ignore:.*torch_dtype.*")
def test_torchao_pipeline_folder_loads_in_diffusers_and_diffusers_folder_in_ours(tmp_path: Path) -> None:
    import diffusers
    import transformers
    from torchao.quantization import Int8WeightOnlyConfig

    repo = tiny_flux(tmp_path / "flux")
    pipe = Pipeline.from_pretrained(str(repo), quantization={"text_encoder": TorchAoQuantizer("int8wo"), "text_encoder_2": TorchAoQuantizer("int8wo")})
    image = _image(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    theirs = diffusers.FluxPipeline.from_pretrained(tmp_path / "saved")
    theirs.set_progress_bar_config(disable=True)
    assert type(theirs.text_encoder.encoder.layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"
    assert np.abs(_image(theirs) - image).max() <= 1e-5
    # diffusers quantizing the text encoders with transformers' TorchAoConfig, as PipelineQuantizationConfig does
    config = diffusers.PipelineQuantizationConfig(
        quant_mapping={name: transformers.TorchAoConfig(Int8WeightOnlyConfig()) for name in ("text_encoder", "text_encoder_2")}
    )
    quantized = diffusers.FluxPipeline.from_pretrained(repo, quantization_config=config)
    quantized.save_pretrained(tmp_path / "diffusers")
    ours = Pipeline.from_pretrained(str(tmp_path / "diffusers"))
    assert quantizer_of(ours.components["text_encoder_2"]) == TorchAoQuantizer("int8wo")
    assert np.abs(_image(ours) - image).max() <= 1e-5


def test_a_gguf_text_encoder_is_not_saved_quietly(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from diffblocks.components.models.gguf_t5 import load_gguf_text_encoder
    from diffblocks.components.quantizers import GGUFQuantizer
    from tests.quantizers.test_gguf_t5 import write_t5_gguf

    repo = tiny_flux(tmp_path / "flux")
    t5 = T5EncoderModel.from_pretrained(repo / "text_encoder_2").eval()
    path = write_t5_gguf(tmp_path / "t5.gguf", t5, "Q8_0")
    encoder = load_gguf_text_encoder(path, config=repo / "text_encoder_2", quantizer=GGUFQuantizer("float32"))
    pipe = Pipeline.from_pretrained(str(repo), components={"text_encoder_2": encoder})
    with pytest.raises(TypeError, match=r"component 'text_encoder_2' \(T5EncoderModel\) is quantized .* its own models only"):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    assert isinstance(encoder, PreTrainedModel)


def test_truncated_weights_and_missing_tensors_are_named(tmp_path: Path) -> None:
    model = quantize(_clip(), TorchAoQuantizer("int8wo"))
    save_quantized_transformers(model, tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_quantized_transformers(CLIPTextModel, tmp_path / "cut")
    save_quantized_transformers(model, tmp_path / "deeper")
    config = json.loads((tmp_path / "deeper" / "config.json").read_text())
    (tmp_path / "deeper" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"encoder\.layers\.2\..* stay empty"):
        load_quantized_transformers(CLIPTextModel, tmp_path / "deeper")
