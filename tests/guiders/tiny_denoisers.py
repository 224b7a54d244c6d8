"""Tiny diffusers denoisers with the module names our models keep (stand-ins for SD/SDXL and Flux)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from torch import Tensor, nn

TXT_LEN = 6


# diffusers config keys, so the same dicts build diffusers' models and ours (``from_config``)
TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "transformer_layers_per_block": (1, 2),
    "cross_attention_dim": 16,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
TINY_FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 8,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "pooled_projection_dim": 8,
    "axes_dims_rope": (2, 2, 4),
}


def tiny_unet() -> UNet2DConditionModel:
    """Two levels; the mid block holds two transformer blocks, like SDXL's stack of ten."""
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET_CONFIG).eval()


def unet_inputs(batch: int = 1, height: int = 8, width: int = 8) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(batch, 4, height, width, generator=g),
        "timestep": torch.tensor(10),
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
    }


def tiny_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(**TINY_FLUX_CONFIG).eval()


def flux_inputs(batch: int = 1, side: int = 4, *, rows: int | None = None, cols: int | None = None) -> dict[str, Tensor]:
    """Inputs for a ``rows`` x ``cols`` token grid (``side`` x ``side`` unless given), ids as prepare_image_ids makes them."""
    rows, cols = rows or side, cols or side
    g = torch.Generator().manual_seed(2)
    grid_rows, grid_cols = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(grid_rows), grid_rows, grid_cols], dim=-1).reshape(-1, 3).float()
    return {
        "hidden_states": torch.randn(batch, rows * cols, 8, generator=g),
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
    return [(name, sum(len(hooks) for hooks in _hook_dicts(m).values())) for name, m in model.named_modules()]


def _hook_dicts(module: nn.Module) -> dict[str, dict[Any, Any]]:
    # every hook registry torch keeps on a module (forward, pre, with-kwargs, always-called, backward, state-dict)
    return {k: v for k, v in vars(module).items() if "hooks" in k and isinstance(v, dict)}


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything an adapter could leave behind: parameters and buffers, every hook dict, every attribute name."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "hooks": {name: {k: list(v.items()) for k, v in _hook_dicts(m).items()} for name, m in model.named_modules()},
        "attributes": {name: (type(m), sorted(vars(m))) for name, m in model.named_modules()},
        "parameter_ids": [id(p) for p in model.parameters()],
    }


def assert_same(model: nn.Module, before: dict[str, Any]) -> None:
    """``model`` is exactly as :func:`snapshot` found it."""
    after = snapshot(model)
    assert after["hooks"] == before["hooks"]
    assert after["attributes"] == before["attributes"]
    assert after["parameter_ids"] == before["parameter_ids"]
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())
