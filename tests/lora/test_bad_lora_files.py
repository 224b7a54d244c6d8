"""Bad LoRA input: each refused with an error that names what is wrong, and the model left unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffblocks.components.lora import LoRA, LoRAWeights, adapter_names, eject, fuse, inject, set_weights
from diffblocks.components.models.unet import UNet2DConditionModel
from tests.lora.lora_files import SD15, SDXL, peft_lora, save_unet


@pytest.fixture
def unet(tmp_path: Path) -> UNet2DConditionModel:
    save_unet(SD15, tmp_path / "unet")
    return UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()


def _same_modules_and_weights(model: torch.nn.Module, modules: dict[str, torch.nn.Module], state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return dict(model.named_modules()) == modules and now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_lora_for_another_model_size_names_layer_and_both_shapes(unet: UNet2DConditionModel, tmp_path: Path) -> None:
    other = peft_lora({**SD15, "cross_attention_dim": 24}, tmp_path / "other", seed=1)  # attn2.to_k reads 24 features
    modules, state = dict(unet.named_modules()), {k: v.clone() for k, v in unet.state_dict().items()}
    lora = LoRA.from_file(other, unet, name="other")
    with pytest.raises(ValueError, match=r"layer '.*attn2\.to_k' has weight \(32, 32\), but the LoRA's update is \(32, 24\)"):
        inject(unet, lora)
    assert _same_modules_and_weights(unet, modules, state) and adapter_names(unet) == []


def test_lora_for_another_layout_names_the_unknown_keys(unet: UNet2DConditionModel, tmp_path: Path) -> None:
    sdxl = peft_lora(SDXL, tmp_path / "sdxl", seed=1)  # SDXL's attention sits in the second level
    unknown = r"\d+ key\(s\) of this LoRA file match no layer of UNet2DConditionModel: unet\.down_blocks\.1\.attentions\.0"
    with pytest.raises(ValueError, match=unknown):
        LoRA.from_file(sdxl, unet)
    tensors = load_file(peft_lora(SD15, tmp_path / "a", seed=1))
    save_file({**tensors, "text_encoder.text_model.q_proj.lora_A.weight": torch.zeros(4, 32)}, tmp_path / "te.safetensors")
    match = r"1 key\(s\) .*: text_encoder\.text_model\.q_proj\.lora_A\.weight\. The file is for another.* \(1 of them are for a text"
    with pytest.raises(ValueError, match=match):
        LoRA.from_file(tmp_path / "te.safetensors", unet)


def test_pickle_needs_opt_in(unet: UNet2DConditionModel, tmp_path: Path) -> None:
    tensors = load_file(peft_lora(SD15, tmp_path / "a", seed=1))
    torch.save(tensors, tmp_path / "lora.bin")
    with pytest.raises(ValueError, match=r"lora\.bin is a pickle; .*allow_pickle=True"):
        LoRA.from_file(tmp_path / "lora.bin", unet)
    assert len(LoRA.from_file(tmp_path / "lora.bin", unet, allow_pickle=True).layers) == len(tensors) // 2


def test_rank_zero_nan_and_half_layers_are_refused(unet: UNet2DConditionModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="share a rank above 0"):
        LoRAWeights(torch.zeros(0, 4), torch.zeros(3, 0), alpha=1.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        LoRAWeights(torch.full((2, 4), float("nan")), torch.zeros(3, 2), alpha=1.0)
    tensors = load_file(peft_lora(SD15, tmp_path / "a", seed=1))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    save_file({**tensors, key: torch.full_like(tensors[key], float("inf"))}, tmp_path / "inf.safetensors")
    with pytest.raises(ValueError, match=rf"LoRA layer '{key[5:-14]}': LoRA weights hold NaN"):
        LoRA.from_file(tmp_path / "inf.safetensors", unet)
    save_file({k: v for k, v in tensors.items() if k != key}, tmp_path / "half.safetensors")
    with pytest.raises(ValueError, match="lacks its up matrix"):
        LoRA.from_file(tmp_path / "half.safetensors", unet)


def test_unknown_and_duplicate_names_and_changes_while_fused(unet: UNet2DConditionModel, tmp_path: Path) -> None:
    path = peft_lora(SD15, tmp_path / "a", seed=1)
    inject(unet, LoRA.from_file(path, unet, name="a"))
    with pytest.raises(ValueError, match="a LoRA named 'a' is already attached"):
        inject(unet, LoRA.from_file(path, unet, name="a"))
    with pytest.raises(KeyError, match=r"no LoRA named \['b'\] is attached to UNet2DConditionModel; attached: \['a'\]"):
        set_weights(unet, {"b": 1.0})
    with pytest.raises(KeyError, match="no LoRA named 'b'"):
        eject(unet, "b")
    fuse(unet)
    with pytest.raises(ValueError, match="is fused; unfuse it before changing adapter weights"):
        set_weights(unet, {"a": 0.5})
    with pytest.raises(ValueError, match="is fused; unfuse it before attaching LoRA 'c'"):
        inject(unet, LoRA.from_file(path, unet, name="c"))


def test_quantized_weights_refuse_to_fuse_and_nothing_is_fused(unet: UNet2DConditionModel, tmp_path: Path) -> None:
    inject(unet, LoRA.from_file(peft_lora(SD15, tmp_path / "a", seed=1), unet, name="a"))
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    layer = unet.get_submodule("up_blocks.1.attentions.0.proj_out")
    layer.base.weight = torch.nn.Parameter(layer.base.weight.data.to(torch.int8), requires_grad=False)  # as if quantized
    state["up_blocks.1.attentions.0.proj_out.base.weight"] = layer.base.weight.data
    with pytest.raises(ValueError, match=r"Tensor weights of torch.int8 \(quantized\) cannot take a fused LoRA"):
        fuse(unet)
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
