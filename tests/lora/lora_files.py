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


def original_from_peft(peft_file: Path, model: torch.nn.Module, out: Path, *, prefix: str, alpha: float) -> Path:
    """The LoRA of a diffusers/PEFT UNet file written in the original code's names (SGM for SDXL), kohya's way."""
    from safetensors.torch import load_file

    from diffblocks.components.models.single_file.ldm import unet_table

    config = model.to_config()  # type: ignore[operator]
    tensors: dict[str, Tensor] = {}
    for key, value in load_file(peft_file).items():
        module, _, part = key.removeprefix("unet.").rpartition(".lora_")
        rule = unet_table(module + ".weight", config)
        assert rule is not None, module
        name = prefix + rule.key.removesuffix(".weight").replace(".", "_" if prefix == "lora_unet_" else ".")
        if part == "A.weight":
            tensors[f"{name}.lora_down.weight"] = value
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
        else:
            tensors[f"{name}.lora_up.weight"] = value * (value.shape[1] / alpha)
    save_file(tensors, out)
    return out


def kohya_flux_lora(
    model: torch.nn.Module,
    out: Path,
    *,
    seed: int,
    blocks: tuple[str, ...] = ("double_blocks.", "single_blocks."),
    rank: int = 4,
    alpha: float = 2.0,
) -> Path:
    """A random kohya LoRA of a Flux transformer's blocks in BFL's names (fused ``qkv``, ``linear1``), as sd-scripts writes."""
    from diffblocks.components.lora import layer_names, targets

    _, original = layer_names(model, targets(model))
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    for layer, found in original.items():
        if not layer.startswith(blocks):
            continue
        width = model.get_submodule(found[0].module).in_features
        rows = max(t.rows[1] if t.rows else model.get_submodule(t.module).out_features for t in found)
        name = "lora_unet_" + layer.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, width, generator=g) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn(rows, rank, generator=g) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, out)
    return out


def diffusers_names_of_kohya_flux(kohya: Path, out: Path, *, inner: int) -> Path:
    """The same LoRA in diffusers' names: fused ``qkv`` and ``linear1`` split by rows (alpha must equal the rank)."""
    from safetensors.torch import load_file

    double: dict[str, str | tuple[str, ...]] = {
        "img_attn_proj": "attn.to_out.0",
        "txt_attn_proj": "attn.to_add_out",
        "img_mlp_0": "ff.net.0.proj",
        "img_mlp_2": "ff.net.2",
        "txt_mlp_0": "ff_context.net.0.proj",
        "txt_mlp_2": "ff_context.net.2",
        "img_mod_lin": "norm1.linear",
        "txt_mod_lin": "norm1_context.linear",
        "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    }
    single: dict[str, str | tuple[str, ...]] = {
        "linear2": "proj_out",
        "modulation_lin": "norm.linear",
        "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    }
    tensors: dict[str, Tensor] = {}
    for key, value in load_file(kohya).items():
        if key.endswith(".alpha"):
            continue
        flat, part = key.removeprefix("lora_unet_").split(".", 1)
        kind, _, index, layer = flat.split("_", 3)
        block = "transformer_blocks" if kind == "double" else "single_transformer_blocks"
        names = (double if kind == "double" else single)[layer]
        for i, name in enumerate((names,) if isinstance(names, str) else names):
            down = part == "lora_down.weight"
            piece = value if down or isinstance(names, str) else value[i * inner : (i + 1) * inner if i < 3 else None]
            tensors[f"transformer.{block}.{index}.{name}.lora_{'A' if down else 'B'}.weight"] = piece.clone()
    save_file(tensors, out)
    return out
