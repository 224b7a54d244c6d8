"""LoRA files made by the tests: random PEFT adapters saved by diffusers, and their kohya layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers import UNet2DConditionModel as RefUNet
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import Tensor

SD15: dict[str, Any] = {
    "sample_size": 16,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
}
SDXL: dict[str, Any] = {
    "sample_size": 16,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": (2, 4),
    "transformer_layers_per_block": (1, 2),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24 + 6 * 8,
}
# attention, feed-forward, projections and (LoCon) the resnets' convolutions
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2"]


def save_unet(config: dict[str, Any], folder: Path) -> RefUNet:
    torch.manual_seed(0)
    ref = RefUNet(**config).eval()
    ref.save_pretrained(folder)
    return ref


def peft_lora(config: dict[str, Any] | RefUNet, folder: Path, *, seed: int, rank: int = 4) -> Path:
    """A random LoRA (alpha = rank) made by PEFT on a diffusers UNet (of a config, or a copy of one), saved by diffusers."""
    import copy

    torch.manual_seed(0)
    ref = copy.deepcopy(config) if isinstance(config, RefUNet) else RefUNet(**config)
    torch.manual_seed(seed)
    ref.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=UNET_TARGETS, init_lora_weights=False))
    layers = get_peft_model_state_dict(ref)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def kohya_from_peft(peft_file: Path, out: Path, *, alpha: float) -> Path:
    """The same LoRA in kohya's layout, with ``alpha`` given and ``up`` rescaled so the update is unchanged."""
    from safetensors.torch import load_file

    tensors: dict[str, Tensor] = {}
    for key, value in load_file(peft_file).items():
        module, _, part = key.removeprefix("unet.").rpartition(".lora_")
        flat = "lora_unet_" + module.replace(".", "_")
        if part == "A.weight":
            tensors[f"{flat}.lora_down.weight"] = value
            tensors[f"{flat}.alpha"] = torch.tensor(alpha)
        else:
            rank = value.shape[1]
            tensors[f"{flat}.lora_up.weight"] = value * (rank / alpha)
    save_file(tensors, out)
    return out


FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp", "proj_out"]


def flux_peft_lora(reference: torch.nn.Module, folder: Path, *, seed: int, rank: int = 4) -> Path:
    """A random PEFT LoRA on a copy of a diffusers Flux transformer, saved by diffusers' Flux pipeline."""
    import copy

    from diffusers import FluxPipeline

    model = copy.deepcopy(reference)
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=FLUX_TARGETS, init_lora_weights=False))
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(model), safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"
