"""Quantized pipelines: built from a repository, swapped, saved and loaded back, against diffusers' quantized images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.components.models.flux import FluxTransformer2DModel
from diffblocks.components.quantizers import (
    GGUFQuantizer,
    QuantoQuantizer,
    TorchAoQuantizer,
    UnsupportedQuantizationError,
    quantizer_of,
)
from diffblocks.components.quantizers.memory import format_memory
from tests.presets.flux_fixtures import tiny_flux

KWARGS: dict[str, Any] = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, max_sequence_length=16)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_flux(tmp_path_factory.mktemp("flux") / "dev")


def _image(pipe: Any) -> np.ndarray:
    generator = torch.Generator().manual_seed(7)
    if isinstance(pipe, Pipeline):
        return np.asarray(pipe(**KWARGS, generator=generator, output_type="np", progress=False).images)
    return np.asarray(pipe(**KWARGS, generator=generator, output_type="np").images)


def _diffusers_pipe(repo: Path, transformer: Any = None) -> Any:
    import diffusers

    pipe = diffusers.FluxPipeline.from_pretrained(repo, **({"transformer": transformer} if transformer is not None else {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.filterwarnings("ignore:.*torch_dtype.*")
def test_quantized_image_differs_from_float_and_matches_diffusers_quantized(repo: Path) -> None:
    import diffusers
    from diffusers import QuantoConfig

    ours = Pipeline.from_pretrained(str(repo), quantization={"transformer": QuantoQuantizer("int4")})
    transformer = diffusers.FluxTransformer2DModel.from_pretrained(repo, subfolder="transformer", quantization_config=QuantoConfig("int4"))
    image = _image(ours)
    assert np.abs(image - _image(_diffusers_pipe(repo, transformer))).max() <= 1e-5
    assert np.abs(image - _image(_diffusers_pipe(repo))).max() > 1e-3  # the quantization is real
    assert quantizer_of(ours.components["transformer"]) == QuantoQuantizer("int4")


def test_one_quantizer_covers_the_denoiser_and_text_encoders(repo: Path) -> None:
    pipe = Pipeline.from_pretrained(str(repo), quantization=TorchAoQuantizer("int8wo"))
    rows = {row.name: row for row in pipe.memory()}
    assert {name for name, row in rows.items() if row.quantizer} == {"transformer", "text_encoder", "text_encoder_2"}
    assert rows["transformer"].quantizer == "TorchAoQuantizer(quant_type='int8wo')"
    # int8 weights: a quarter of float32, plus float scales and the unquantized norms and biases
    assert rows["transformer"].bytes < 0.5 * rows["transformer"].original_bytes
    assert rows["vae"].quantizer is None and rows["vae"].bytes == rows["vae"].original_bytes
    assert rows["scheduler"].bytes == 0 and set(rows["transformer"].devices) == {"cpu"}
    assert "transformer" in format_memory(pipe.memory())


def test_swapping_a_quantizer_requantizes_from_the_original_weights(repo: Path) -> None:
    floats = Pipeline.from_pretrained(str(repo))
    float_image = _image(floats)
    pipe = Pipeline.from_pretrained(str(repo), quantization={"transformer": QuantoQuantizer("int4")})
    int4 = _image(pipe)
    pipe.quantize({"transformer": QuantoQuantizer("int8")})
    int8 = _image(pipe)
    assert quantizer_of(pipe.components["transformer"]) == QuantoQuantizer("int8")
    fresh = Pipeline.from_pretrained(str(repo), quantization={"transformer": QuantoQuantizer("int8")})
    assert np.array_equal(int8, _image(fresh))  # not int8 of the int4 weights
    assert not np.array_equal(int8, int4)
    pipe.quantize({"transformer": None})
    assert np.array_equal(_image(pipe), float_image)


def test_a_component_given_as_an_object_is_quantized_as_a_copy(repo: Path) -> None:
    transformer = FluxTransformer2DModel.from_pretrained(repo / "transformer")
    pipe = Pipeline.from_pretrained(str(repo), components={"transformer": transformer})
    float_image = _image(pipe)
    pipe.quantize({"transformer": TorchAoQuantizer("int8wo")})
    assert pipe.components["transformer"] is not transformer and quantizer_of(transformer) is None
    pipe.quantize({"transformer": QuantoQuantizer("int8")})  # from the kept original, not the int8 copy
    assert quantizer_of(pipe.components["transformer"]) == QuantoQuantizer("int8")
    pipe.quantize({"transformer": None})
    assert pipe.components["transformer"] is transformer and np.array_equal(_image(pipe), float_image)


def test_quantizing_what_holds_no_weights_fails_when_built(repo: Path) -> None:
    for name in ("scheduler", "tokenizer", "guider"):
        with pytest.raises(ValueError, match=rf"component '{name}' is a \w+, which holds no weights to quantize; quantize one of: .*transformer"):
            Pipeline.from_pretrained(str(repo), quantization={name: TorchAoQuantizer("int8wo")})
    with pytest.raises(ValueError, match="not components of the pipeline"):
        Pipeline.from_pretrained(str(repo), quantization={"unet": TorchAoQuantizer("int8wo")})
    with pytest.raises(ValueError, match="GGUF weights come quantized in .gguf files"):
        Pipeline.from_pretrained(str(repo), quantization={"transformer": GGUFQuantizer()})
    with pytest.raises(UnsupportedQuantizationError):
        Pipeline.from_pretrained(str(repo), quantization={"transformer": TorchAoQuantizer("float8dq")})


def test_quantized_pipeline_saves_in_diffusers_layout_and_loads_back(repo: Path, tmp_path: Path) -> None:
    pipe = Pipeline.from_pretrained(str(repo), quantization={"transformer": TorchAoQuantizer("int8wo")})
    image = _image(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    back = Pipeline.from_pretrained(str(tmp_path / "saved"))
    assert quantizer_of(back.components["transformer"]) == TorchAoQuantizer("int8wo")
    assert np.array_equal(_image(back), image)


def test_quantized_text_encoders_are_saved_quantized(repo: Path, tmp_path: Path) -> None:
    # transformers' layout (tests/quantizers/test_text_encoders.py); a GGUF text encoder is still refused there
    pipe = Pipeline.from_pretrained(str(repo), quantization=TorchAoQuantizer("int8wo"))
    pipe.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "text_encoder" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert quantizer_of(Pipeline.from_pretrained(str(tmp_path / "saved")).components["text_encoder"]) == TorchAoQuantizer("int8wo")


def test_a_gguf_transformer_runs_in_a_pipeline_and_reports_its_memory(repo: Path, tmp_path: Path) -> None:
    import diffusers

    from diffblocks.components.models.gguf import load_gguf
    from tests.quantizers.gguf_files import stored, to_bfl, write_gguf

    reference = diffusers.FluxTransformer2DModel.from_pretrained(repo, subfolder="transformer")
    path = write_gguf(tmp_path / "flux-Q8_0.gguf", to_bfl(stored(reference.state_dict(), "Q8_0")))
    transformer = load_gguf(path, FluxTransformer2DModel, config=reference.config, quantizer=GGUFQuantizer("float32"))
    pipe = Pipeline.from_pretrained(str(repo), components={"transformer": transformer})
    image = _image(pipe)
    theirs = diffusers.FluxTransformer2DModel.from_single_file(
        str(write_gguf(tmp_path / "diffusers-Q8_0.gguf", stored(reference.state_dict(), "Q8_0"))),
        config=str(repo), subfolder="transformer",
        quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32), torch_dtype=torch.float32,
    )
    # diffusers' float16 scale products against our float32 ones (see test_gguf.py)
    assert np.abs(image - _image(_diffusers_pipe(repo, theirs))).max() <= 2e-3
    row = {r.name: r for r in pipe.memory()}["transformer"]
    assert row.quantizer == "GGUFQuantizer(compute_dtype='float32')" and row.bytes < 0.5 * row.original_bytes
    with pytest.raises(ValueError, match="GGUF weights come quantized"):
        pipe.quantize({"transformer": GGUFQuantizer()})
