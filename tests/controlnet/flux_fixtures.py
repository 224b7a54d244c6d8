"""Tiny diffusers Flux ControlNets shaped like the tiny Flux pipeline's transformer (tests/presets/flux_fixtures.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FLUX_NET = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
)  # fmt: skip


def tiny_flux_controlnet(folder: Path, *, seed: int = 1, **changes: Any) -> Path:
    """A diffusers FluxControlNetModel with random (not zero) output layers, saved to ``folder``."""
    import diffusers

    torch.manual_seed(seed)
    net = diffusers.FluxControlNetModel(**{**FLUX_NET, "guidance_embeds": True, **changes})
    with torch.no_grad():
        for param in net.parameters():
            if not param.abs().sum():  # the zero layers: give them weights, so the control shows
                param.normal_(std=0.3)
    net.save_pretrained(folder)
    return folder
