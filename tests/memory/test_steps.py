"""A denoiser step's activations, estimated from the requested size: the widest attention, the batch, the backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffblocks.components.memory.steps import StepShape, flux_shape, step_bytes, unet_shape
from tests.memory.anon_memory import probe_env

SDXL = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20]}
MIB = 2**20


@pytest.mark.parametrize(
    ("shape", "tokens", "channels", "heads"),
    [
        (flux_shape({}, height=1024, width=1024), 4096 + 512, 3072, 24),  # 2x2 packed latents + T5 tokens, joint
        (flux_shape({}, height=512, width=768), 32 * 48 + 512, 3072, 24),
        (flux_shape({}, height=1024, width=1024, text_tokens=256), 4096 + 256, 3072, 24),  # schnell's 256 T5 tokens
        (unet_shape({}, height=512, width=512), 64 * 64, 320, 8),         # SD 1.5: its first down block attends
        (unet_shape(SDXL, height=1024, width=1024), 64 * 64, 640, 10),    # SDXL: the second, at half resolution
        (unet_shape(SDXL, height=768, width=1344), 48 * 84, 640, 10),
    ],
)
def test_the_widest_attention_of_each_family(shape: StepShape, tokens: int, channels: int, heads: int) -> None:
    assert (shape.tokens, shape.channels, shape.heads) == (tokens, channels, heads)


@pytest.mark.parametrize(
    ("shape", "batch", "backend", "expected_mib"),
    [
        (flux_shape({}, height=1024, width=1024), 1, "sdpa", 594.4),       # Flux.1-dev: distilled guidance, one pass
        (flux_shape({}, height=1024, width=1024), 1, "flash_attn_3", 594.4),
        (flux_shape({}, height=1024, width=1024), 1, "reference", 2538.0),  # + 24 heads x 4608² scores, twice
        (flux_shape({}, height=1024, width=1024), 2, "sdpa", 1188.8),       # true CFG batched: two passes at once
        (unet_shape({}, height=512, width=512), 2, "sdpa", 142.1),          # SD 1.5, CFG batched: skip connections included
        (unet_shape({}, height=512, width=512), 2, "sdpa_math", 1165.9),
        (unet_shape(SDXL, height=1024, width=1024), 2, "sdpa", 340.3),
    ],
)
def test_step_bytes_by_batch_and_backend(shape: StepShape, batch: int, backend: str, expected_mib: float) -> None:
    assert step_bytes(shape, batch=batch, backend=backend) / MIB == pytest.approx(expected_mib, abs=0.05)


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="image size 1000x1024 must be positive multiples of 16 pixels"):
        flux_shape({}, height=1000, width=1024)
    with pytest.raises(ValueError, match="image size 0x512 must be positive multiples of 8 pixels"):
        unet_shape({}, height=0, width=512)
    with pytest.raises(ValueError, match="batch 0 and .* must be positive"):
        step_bytes(StepShape(16, 8, 2), batch=0)


_PROBE = Path(__file__).with_name("probe_step_memory.py")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc (Linux)")
@pytest.mark.parametrize("size", [256, 512])
def test_the_estimate_is_near_a_measured_step(size: int) -> None:
    from diffblocks.presets.tiny.preset import builtin_model_dir

    config = json.loads((builtin_model_dir() / "unet" / "config.json").read_text())
    estimate = step_bytes(unet_shape(config, height=size, width=size), batch=2, itemsize=4)
    done = subprocess.run([sys.executable, str(_PROBE), str(size), "2"], capture_output=True, text=True, check=True, env=probe_env())
    measured = int(done.stdout.split()[-1])
    # within 25% below and 2x above what the tiny UNet's forward held on the CPU (float32, batch 2)
    assert measured / 1.25 < estimate < 2 * measured, f"estimated {estimate / MIB:.1f} MiB, measured {measured / MIB:.1f} MiB"
