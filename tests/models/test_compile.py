"""Compiled models as components, and ``Pipeline.compile``: same checks, same files, same images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.components.compiled import unwrap_compiled
from diffblocks.components.models.compile import compile_model
from diffblocks.components.models.flux import FluxParams, FluxTransformer2DModel, prepare_image_ids, prepare_text_ids
from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.presets.tiny.preset import builtin_model_dir


def _builtin() -> Pipeline:
    return Pipeline.from_pretrained(str(builtin_model_dir()))


def _image(pipe: Pipeline) -> np.ndarray:
    out = pipe(prompt="a red circle above a blue square", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0), progress=False)  # fmt: skip
    return np.asarray(out.images)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_torch_compile_wrapper_is_checked_and_saved_as_the_model(tmp_path: Path) -> None:
    pipe = _builtin()
    unet = pipe.components["unet"]
    pipe.save_pretrained(tmp_path / "eager")
    compiled = torch.compile(unet, backend="eager")  # lazy: nothing is compiled until it is called
    assert not isinstance(compiled, UNet2DConditionModel) and unwrap_compiled(compiled) is unet
    pipe.update_components(unet=compiled)  # the plan checks the component's type through the wrapper
    assert pipe.manager.component_type(pipe.component_keys()["unet"]) is UNet2DConditionModel
    pipe.save_pretrained(tmp_path / "compiled")
    eager, saved = _files(tmp_path / "eager" / "unet"), _files(tmp_path / "compiled" / "unet")
    assert saved == eager and any(name.endswith(".safetensors") for name in saved)


def test_regional_compile_keeps_the_image_and_the_model() -> None:
    pipe = _builtin()
    unet = pipe.components["unet"]
    expected = _image(pipe)
    # "eager" traces every compiled region through dynamo and runs the captured graphs without code
    # generation, which takes minutes on a CPU; bench/compile_cpu.py measures inductor, the default backend.
    assert pipe.compile(backend="eager") is pipe
    assert pipe.components["unet"] is unet and unet._compiled_call_impl is None
    regions = [m for m in unet.modules() if m._compiled_call_impl is not None]
    assert {type(m).__name__ for m in regions} == {"ResnetBlock2D", "SpatialTransformer"}
    assert np.abs(_image(pipe) - expected).max() <= 1e-5


@torch.no_grad()
def test_regional_compile_of_flux_compiles_its_double_and_single_blocks() -> None:
    params = FluxParams(in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))  # fmt: skip
    model = FluxTransformer2DModel(params).eval()
    inputs = {"encoder_hidden_states": torch.randn(1, 3, 32), "pooled_projections": torch.randn(1, 32),
              "timestep": torch.tensor([0.5]), "img_ids": prepare_image_ids(2, 2), "txt_ids": prepare_text_ids(3)}  # fmt: skip
    x = torch.randn(1, 4, 4)
    expected = model(x, **inputs)
    compile_model(model, backend="eager")
    regions = [type(m).__name__ for m in model.modules() if m._compiled_call_impl is not None]
    assert regions == ["FluxTransformerBlock"] * 2 + ["FluxSingleTransformerBlock"] * 2
    assert (model(x, **inputs) - expected).abs().max() <= 1e-6


def test_compile_errors_name_the_fix() -> None:
    pipe = _builtin()
    with pytest.raises(KeyError, match=r"has no component 'transformer'; components: \[.*'unet'"):
        pipe.compile(component="transformer")
    with pytest.raises(ValueError, match="Linear declares no repeated blocks.*regional=False"):
        compile_model(torch.nn.Linear(2, 2))
    whole = compile_model(torch.nn.Linear(2, 2), regional=False, backend="eager")
    assert whole._compiled_call_impl is not None
