"""Tiny diffusers denoisers with the module names our models keep (stand-ins for SD/SDXL and Flux)."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from torch import Tensor, nn

TXT_LEN = 6


def tiny_unet() -> UNet2DConditionModel:
    """Two levels; the mid block holds two transformer blocks, like SDXL's stack of ten."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def unet_inputs(batch: int = 1, height: int = 8, width: int = 8) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(batch, 4, height, width, generator=g),
        "timestep": torch.tensor(10),
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
    }


def tiny_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def flux_inputs(batch: int = 1, side: int = 4) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(2)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    return {
        "hidden_states": torch.randn(batch, side * side, 8, generator=g),
        "encoder_hidden_states": torch.randn(batch, TXT_LEN, 16, generator=g),
        "pooled_projections": torch.randn(batch, 8, generator=g),
        "timestep": torch.full((batch,), 0.5),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(TXT_LEN, 3),
    }


def run(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def hook_counts(model: nn.Module) -> list[tuple[str, int]]:
    """Number of registered hooks of every kind on every submodule."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs")
    return [(name, sum(len(getattr(m, k)) for k in kinds)) for name, m in model.named_modules()]
