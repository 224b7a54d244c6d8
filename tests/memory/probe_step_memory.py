"""Run by tests/memory/test_steps.py in a process of its own: the most anonymous memory one tiny UNet forward holds."""

import sys

import torch

from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.presets.tiny.preset import builtin_model_dir
from tests.memory.anon_memory import peak_during

model = UNet2DConditionModel.from_pretrained(builtin_model_dir() / "unet")
size, batch = int(sys.argv[1]), int(sys.argv[2])
sample, text = torch.randn(batch, 4, size // 8, size // 8), torch.randn(batch, 77, 384)
with torch.inference_mode():
    model(sample[:1, :, :8, :8], 10, text[:1])  # kernels and the allocator warmed up first
with torch.inference_mode():
    held, _ = peak_during(lambda: model(sample, 10, text), every=0.0002)
print(held)
