"""NVIDIA ModelOpt on our models against ModelOpt applied to diffusers' models with diffusers' config.

diffusers 0.42's own ModelOpt path cannot run beside ModelOpt 0.47 (its config builder reads a list
as a dict, and with a config given its weights stay uncompressed, so the first forward raises);
the reference here is therefore diffusers' model quantized by ModelOpt's ``apply_mode``,
``calibrate`` and ``compress`` with the config diffusers builds, which the first test proves equal
to ours.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel as DiffusersFlux
from diffusers import UNet2DConditionModel as DiffusersUNet

from diffblocks.components.models.flux import FluxTransformer2DModel
from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.components.quantizers import (
    AbstractQuantizer,
    ModelOptQuantizer,
    QuantizerNotInstalledError,
    UnsupportedQuantizationError,
    quantize,
    quantizer_from_config,
    quantizer_from_diffusers,
    quantizer_of,
)
from tests.guiders.tiny_denoisers import TINY_UNET_CONFIG

mtq = pytest.importorskip("modelopt.torch.quantization")

FLUX = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)
CPU_CASES = [
    ModelOptQuantizer("FP8"),
    ModelOptQuantizer("INT8"),
    ModelOptQuantizer("INT8", block_quantize=16, channel_quantize=-1),
    ModelOptQuantizer("INT4", block_quantize=16, channel_quantize=-1),
]


def _flux_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 16, 64, generator=g), "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g), "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]), "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3),
    }


def _unet_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"sample": torch.randn(1, 4, 8, 8, generator=g), "timestep": torch.tensor(500.0),
            "encoder_hidden_states": torch.randn(1, 6, 16, generator=g)}


def _run(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, (DiffusersFlux, DiffusersUNet)):
            return model(**inputs, return_dict=False)[0]
        out = model(**inputs)
        return out if isinstance(out, torch.Tensor) else out.sample


def _modelopt_on_diffusers(model: torch.nn.Module, quantizer: ModelOptQuantizer) -> torch.nn.Module:
    """What diffusers' NVIDIAModelOptQuantizer does to a model: apply the quantize mode, calibrate, compress."""
    from modelopt.torch.opt import apply_mode

    with warnings.catch_warnings():  # ModelOpt 0.47 calls the dict form diffusers writes "deprecated"
        warnings.simplefilter("ignore", DeprecationWarning)
        apply_mode(model, mode=[("quantize", quantizer.modelopt_config(quantizer.skipped(model)))])
    mtq.calibrate(model, algorithm="max", forward_loop=None)
    mtq.compress(model)
    return model.eval()


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("flux_float")
    DiffusersFlux(**FLUX).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("unet_float")
    DiffusersUNet(**TINY_UNET_CONFIG).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "settings",
    [dict(quant_type="FP8"), dict(quant_type="INT8", channel_quantize=0),
     dict(quant_type="INT4", block_quantize=16, channel_quantize=-1),
     dict(quant_type="NF4", block_quantize=64, channel_quantize=-1, scale_block_quantize=4, scale_channel_quantize=-1),
     dict(quant_type="NVFP4", block_quantize=16, channel_quantize=-1, scale_block_quantize=4, scale_channel_quantize=-1)],
    ids=lambda s: s["quant_type"],
)
def test_the_modelopt_config_is_the_one_diffusers_builds(monkeypatch: pytest.MonkeyPatch, settings: dict[str, Any]) -> None:
    from diffusers import NVIDIAModelOptConfig

    ours = ModelOptQuantizer(**settings).modelopt_config()
    # diffusers 0.42 reads ModelOpt's default exclusions as a dict (their form before ModelOpt 0.47)
    exclusions = {k: v for k, v in ModelOptQuantizer("FP8").modelopt_config()["quant_cfg"].items()
                  if k not in ("*weight_quantizer", "*input_quantizer", "*output_quantizer", "*q_bmm_quantizer",
                               "*k_bmm_quantizer", "*v_bmm_quantizer", "*softmax_quantizer")}
    monkeypatch.setattr(mtq.config, "_default_disabled_quantizer_cfg", exclusions)
    assert NVIDIAModelOptConfig(**settings).modelopt_config == ours


@pytest.mark.parametrize("quantizer", CPU_CASES, ids=lambda q: q.describe())
def test_quantized_flux_matches_modelopt_on_diffusers_and_reloads(flux_folder: Path, tmp_path: Path, quantizer: ModelOptQuantizer) -> None:
    ours = FluxTransformer2DModel.from_pretrained(flux_folder, quantizer=quantizer)
    theirs = _modelopt_on_diffusers(DiffusersFlux.from_pretrained(flux_folder), quantizer)
    out = _run(ours, _flux_inputs())
    torch.testing.assert_close(out, _run(theirs, _flux_inputs()), rtol=0, atol=1e-6)
    floats = FluxTransformer2DModel.from_pretrained(flux_folder)
    assert not torch.allclose(out, _run(floats, _flux_inputs()), atol=1e-4)  # the quantization is real
    assert ours.memory_bytes() < floats.memory_bytes() / 2
    layer = ours.transformer_blocks[0].attn.to_q
    assert layer.weight.element_size() == 1 and quantizer_of(ours) == quantizer

    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config == json.loads(json.dumps(quantizer.to_diffusers()))
    assert not (tmp_path / "modelopt_state.pth").exists()  # no pickle: the config rebuilds the layers
    back = FluxTransformer2DModel.from_pretrained(tmp_path)
    assert quantizer_of(back) == quantizer and torch.equal(_run(back, _flux_inputs()), out)


@pytest.mark.parametrize("quantizer", [ModelOptQuantizer("INT8"), ModelOptQuantizer("FP8", disable_conv_quantization=True)],
                         ids=lambda q: q.describe())
def test_quantized_unet_matches_modelopt_on_diffusers_and_reloads(unet_folder: Path, tmp_path: Path, quantizer: ModelOptQuantizer) -> None:
    ours = UNet2DConditionModel.from_pretrained(unet_folder, quantizer=quantizer)
    theirs = _modelopt_on_diffusers(DiffusersUNet.from_pretrained(unet_folder), quantizer)
    out = _run(ours, _unet_inputs())
    torch.testing.assert_close(out, _run(theirs, _unet_inputs()), rtol=0, atol=1e-6)
    assert not torch.allclose(out, _run(UNet2DConditionModel.from_pretrained(unet_folder), _unet_inputs()), atol=1e-4)
    conv = ours.down_blocks[0].resnets[0].conv1
    assert (conv.weight.element_size() == 1) is not quantizer.disable_conv_quantization
    ours.save_pretrained(tmp_path)
    back = UNet2DConditionModel.from_pretrained(tmp_path)
    assert torch.equal(_run(back, _unet_inputs()), out)


def test_modules_not_to_convert_stay_float(flux_folder: Path) -> None:
    quantizer = ModelOptQuantizer("INT8", modules_to_not_convert=("x_embedder",))
    model = FluxTransformer2DModel.from_pretrained(flux_folder, quantizer=quantizer)
    assert model.x_embedder.weight.dtype == torch.float32
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.int8
    assert quantizer.to_diffusers()["modelopt_config"]["quant_cfg"]["*x_embedder*"] == {"enable": False}


@pytest.mark.parametrize(
    "quantizer",
    [*CPU_CASES, ModelOptQuantizer("NF4", block_quantize=64, channel_quantize=-1, scale_block_quantize=4, scale_channel_quantize=-1),
     ModelOptQuantizer("INT8", modules_to_not_convert=("proj_out",), disable_conv_quantization=True)],
    ids=lambda q: q.describe(),
)
def test_round_trips_through_json_and_diffusers_config(quantizer: AbstractQuantizer) -> None:
    assert quantizer_from_config(json.loads(json.dumps(quantizer.to_config()))) == quantizer
    assert quantizer_from_diffusers(json.loads(json.dumps(quantizer.to_diffusers()))) == quantizer


def test_spellings_and_bad_settings() -> None:
    assert ModelOptQuantizer("fp8") == ModelOptQuantizer(quant_type="FP8")
    with pytest.raises(ValueError, match="weights only; 'FP8_INT8' asks for activations too. Use 'FP8'"):
        ModelOptQuantizer("FP8_INT8")
    with pytest.raises(ValueError, match="unknown ModelOpt quant type 'INT3'; known: FP8, INT8, INT4, NF4, NVFP4"):
        ModelOptQuantizer("INT3")
    with pytest.raises(ValueError, match=r"'INT4'\) compresses weights in blocks: pass block_quantize and channel_quantize"):
        ModelOptQuantizer("INT4")
    with pytest.raises(ValueError, match="scale_block_quantize and scale_channel_quantize together"):
        ModelOptQuantizer("NF4", block_quantize=64, channel_quantize=-1, scale_block_quantize=4)
    with pytest.raises(ValueError, match="quantizes activations too"):
        quantizer_from_diffusers({"quant_method": "modelopt", "quant_type": "FP8", "weight_only": False})


def test_cuda_only_types_and_a_missing_package_fail_before_loading(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    nvfp4 = ModelOptQuantizer("NVFP4", block_quantize=16, channel_quantize=-1, scale_block_quantize=4, scale_channel_quantize=-1)
    with pytest.raises(UnsupportedQuantizationError, match=r"cannot run on cpu: ModelOpt's NVFP4 kernels need a CUDA GPU"):
        FluxTransformer2DModel.from_pretrained(tmp_path / "absent", quantizer=nvfp4)
    monkeypatch.setitem(sys.modules, "modelopt.torch.quantization", None)
    with pytest.raises(QuantizerNotInstalledError, match=r"'modelopt.torch.quantization'.*pip install nvidia-modelopt"):
        FluxTransformer2DModel.from_pretrained(tmp_path / "absent", quantizer=ModelOptQuantizer("INT8"))
    with pytest.raises(QuantizerNotInstalledError):
        quantize(torch.nn.Linear(4, 4), ModelOptQuantizer("INT8"))


def test_saved_tensors_with_no_place_or_missing_are_named(flux_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    FluxTransformer2DModel.from_pretrained(flux_folder, quantizer=ModelOptQuantizer("INT8")).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["transformer_blocks.0.attn.to_q.weight_quantizer._scale"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"do not fill FluxTransformer2DModel: .*to_q\.weight_quantizer\._scale"):
        FluxTransformer2DModel.from_pretrained(tmp_path)


def test_a_pipeline_with_a_modelopt_unet_runs_saves_and_loads_the_same_image(tmp_path: Path) -> None:
    import numpy as np

    from diffblocks.blocks import Pipeline
    from diffblocks.presets.tiny.preset import builtin_model_dir

    def image(pipe: Pipeline) -> np.ndarray:
        out = pipe(prompt="a small green cross in the center", num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0), progress=False)
        return np.asarray(out.images[0])

    floats = image(Pipeline.from_pretrained(builtin_model_dir()))
    # the UNet's first weight (conv_in) is int8 storage: latents still come in the compute dtype
    pipe = Pipeline.from_pretrained(builtin_model_dir(), quantization={"unet": ModelOptQuantizer("INT8")})
    quantized = image(pipe)
    assert not np.array_equal(quantized, floats)
    pipe.save_pretrained(tmp_path)
    assert np.array_equal(image(Pipeline.from_pretrained(tmp_path)), quantized)
