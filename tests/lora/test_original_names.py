"""LoRA files in the original code's names: kohya's SGM names of SDXL, BFL's names of Flux (fused layers split)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionXLPipeline
from diffusers import UNet2DConditionModel as RefUNet

from diffblocks.components.lora import LoRA, eject, inject
from diffblocks.components.models.unet import UNet2DConditionModel
from tests.lora.lora_files import SDXL, diffusers_names_of_kohya_flux, kohya_flux_lora, original_from_peft, peft_lora, save_unet
from tests.lora.test_unet_lora import _run
from tests.models.test_flux import TINY, _inputs, _ours_from, _reference, _run_ours, _run_ref


def test_sdxl_kohya_file_in_sgm_names_matches_diffusers(tmp_path: Path) -> None:
    save_unet(SDXL, tmp_path / "unet")
    ref, ours = RefUNet.from_pretrained(tmp_path / "unet").eval(), UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    peft_file = peft_lora(SDXL, tmp_path / "a", seed=1)
    kohya = original_from_peft(peft_file, ours, tmp_path / "sgm.safetensors", prefix="lora_unet_", alpha=2.0)
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(kohya), unet_config=ref.config)
    ref.load_lora_adapter(state, network_alphas=alphas, prefix="unet", adapter_name="sgm")
    expected = _run(ref, SDXL)

    comfy = original_from_peft(peft_file, ours, tmp_path / "comfy.safetensors", prefix="diffusion_model.", alpha=2.0)
    for path in (kohya, comfy):
        lora = LoRA.from_file(path, ours, name="sgm")
        assert "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k" in lora.layers
        inject(ours, lora)
        torch.testing.assert_close(_run(ours, SDXL), expected, atol=1e-5, rtol=0)
        eject(ours, "sgm")


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # peft's note on a second adapter
def test_flux_kohya_file_in_bfl_names_matches_diffusers(tmp_path: Path) -> None:
    ref = _reference(True)
    ours = _ours_from(ref)
    inputs = _inputs(True)
    # diffusers' sd-scripts converter splits double blocks by thirds, but single blocks by Flux.1's 3072-wide rows
    double = kohya_flux_lora(ours, tmp_path / "double.safetensors", seed=1, blocks=("double_blocks.",))
    ref.load_lora_adapter(FluxPipeline.lora_state_dict(str(double)), prefix="transformer", adapter_name="pairs")
    expected = _run_ref(ref, inputs)
    lora = LoRA.from_file(double, ours, name="pairs")
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj"} <= set(lora.layers)
    inject(ours, lora)
    torch.testing.assert_close(_run_ours(ours, inputs), expected, atol=1e-5, rtol=0)
    eject(ours, "pairs")

    # every block, alpha = rank: against the same LoRA split into diffusers' names by the test
    full = kohya_flux_lora(ours, tmp_path / "full.safetensors", seed=2, alpha=4.0)
    inner = TINY["num_attention_heads"] * TINY["attention_head_dim"]
    split = diffusers_names_of_kohya_flux(full, tmp_path / "split.safetensors", inner=inner)
    ref.load_lora_adapter(str(split), prefix="transformer", adapter_name="full")
    ref.set_adapters(["full"])
    expected = _run_ref(ref, inputs)
    lora = LoRA.from_file(full, ours, name="full")
    assert {"single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.1.attn.to_v"} <= set(lora.layers)
    inject(ours, lora)
    torch.testing.assert_close(_run_ours(ours, inputs), expected, atol=1e-5, rtol=0)
