"""Run by tests/memory/test_steps.py in a process of its own: the most anonymous memory one tiny UNet forward holds."""

import sys
import threading
import time

import torch

from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.presets.tiny.preset import builtin_model_dir


def anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024
    return 0


model = UNet2DConditionModel.from_pretrained(builtin_model_dir() / "unet")
size, batch = int(sys.argv[1]), int(sys.argv[2])
sample, text = torch.randn(batch, 4, size // 8, size // 8), torch.randn(batch, 77, 384)
with torch.inference_mode():
    model(sample[:1, :, :8, :8], 10, text[:1])  # kernels and the allocator warmed up first
base = anon()
peak, done = [base], [False]


def watch() -> None:
    while not done[0]:
        peak[0] = max(peak[0], anon())
        time.sleep(0.0002)


thread = threading.Thread(target=watch)
thread.start()
with torch.inference_mode():
    model(sample, 10, text)
done[0] = True
thread.join()
print(peak[0] - base)
