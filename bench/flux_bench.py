"""What the Flux GPU benchmarks share: the real and tiny configs, inputs, weight sharing, timing, recording."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FLUX_DEV_CONFIG = dict(guidance_embeds=True)  # diffusers' defaults are Flux.1-dev's transformer
TINY_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=2,
    joint_attention_dim=256, pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)


def timer(device: torch.device) -> Callable[[Callable[[], Any], int], float]:
    if device.type == "cuda":
        from cuda_timing import time_ms

        return lambda fn, repeat: time_ms(fn, warmup=3, repeat=repeat)

    def cpu_ms(fn: Callable[[], Any], repeat: int) -> float:
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu_ms


def inputs(config: dict[str, Any], device: torch.device, dtype: torch.dtype, *, tiny: bool) -> dict[str, torch.Tensor]:
    from diffblocks.components.models.flux import prepare_image_ids, prepare_text_ids

    side, text = (8, 16) if tiny else (64, 512)
    width = config.get("joint_attention_dim", 4096)
    g = torch.Generator(device).manual_seed(1)
    return dict(
        hidden_states=torch.randn(1, side * side, 64, device=device, generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(1, text, width, device=device, generator=g, dtype=dtype),
        pooled_projections=torch.randn(1, config.get("pooled_projection_dim", 768), device=device, generator=g, dtype=dtype),
        timestep=torch.tensor([0.6], device=device, dtype=dtype),
        img_ids=prepare_image_ids(side, side, device=device, dtype=dtype),
        txt_ids=prepare_text_ids(text, device=device, dtype=dtype),
        guidance=torch.tensor([3.5], device=device, dtype=dtype),
    )


def build_reference(config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """diffusers' Flux transformer with random weights made directly in ``dtype`` on ``device`` (no float32 copy)."""
    import diffusers

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return diffusers.FluxTransformer2DModel(**config).eval()
    finally:
        torch.set_default_dtype(default)


def ours_sharing(ref: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Our transformer holding ``ref``'s very weight tensors."""
    from diffblocks.components.models.buffers import materialize_computed_buffers
    from diffblocks.components.models.flux import FluxTransformer2DModel

    with torch.device("meta"):
        ours = FluxTransformer2DModel.from_config(dict(ref.config))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    materialize_computed_buffers(ours, device=device)
    return ours.eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class Recorder:
    """Prints each row as it is measured and keeps every row in ``$OUT/<name>.json`` (if ``$OUT`` is set)."""

    def __init__(self, name: str) -> None:
        self.rows: list[dict[str, Any]] = []
        out = os.environ.get("OUT")
        self.path = Path(out) / f"{name}.json" if out else None

    def add(self, **row: Any) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.path is not None:
            self.path.write_text(json.dumps(self.rows, indent=1))
