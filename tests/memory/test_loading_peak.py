"""Loading reads weights into place: peak CPU memory stays near the model's size, not twice it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.memory.anon_memory import probe_env

_PROBE = r"""
import sys
import torch
from diffblocks.components.models.unet import UNet2DConditionModel
from tests.memory.anon_memory import peak_during

peak, model = peak_during(lambda: UNet2DConditionModel.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2])))
print(peak, sum(p.numel() * p.element_size() for p in model.parameters()))
"""

CONFIG = {"sample_size": 16, "block_out_channels": (128, 256), "layers_per_block": 2, "cross_attention_dim": 256,
          "attention_head_dim": 8, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
          "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc (Linux)")
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_loading_peaks_near_the_model_size(tmp_path: Path, dtype: str) -> None:
    import torch

    from diffblocks.components.models.unet import UNet2DConditionModel

    UNet2DConditionModel.from_config(CONFIG).to(torch.float16).save_pretrained(tmp_path)  # float32 loads cast every tensor
    done = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path), dtype], capture_output=True, text=True, check=True,
                          env=probe_env())
    peak, size = map(int, done.stdout.split()[-2:])
    assert size > 30 * 2**20
    assert peak < 1.25 * size + 16 * 2**20, f"loading peaked at {peak / 2**20:.0f} MiB above its start for a {size / 2**20:.0f} MiB model"
