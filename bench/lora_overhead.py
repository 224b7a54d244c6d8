"""Per-step cost of LoRA on the CPU: no LoRA, unfused (one and two adapters), fused; ours and diffusers (PEFT).

The built-in tiny model's UNet (64-128-192 channels) takes a classifier-free guidance batch
(2 x 4 x 16 x 16 latents, 16 context tokens). A random rank-16 LoRA, made by PEFT on diffusers'
copy of the same UNet and saved by diffusers, updates every attention projection, feed-forward
output and resnet convolution (LoCon). Every configuration's step is timed in turn with the others,
``--repeats`` rounds, and the medians are reported; torch runs on one thread (see
bench/sd_pipeline_cpu.py for why). Each ours/diffusers pair is checked to agree within 1e-4.
Run from the repository root: python bench/lora_overhead.py [--repeats 30] [--rank 16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    from diffusers import StableDiffusionPipeline
    from diffusers import UNet2DConditionModel as RefUNet
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffblocks.components.lora import LoRA, fuse, inject, set_weights
    from diffblocks.components.models.unet import UNet2DConditionModel
    from diffblocks.presets.tiny.preset import builtin_model_dir

    folder = builtin_model_dir() / "unet"
    files = []
    tmp = Path(tempfile.mkdtemp())
    for seed in (1, 2):
        model = RefUNet.from_pretrained(folder)
        torch.manual_seed(seed)
        model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, init_lora_weights=False))
        StableDiffusionPipeline.save_lora_weights(tmp / str(seed), unet_lora_layers=get_peft_model_state_dict(model))
        files.append(tmp / str(seed) / "pytorch_lora_weights.safetensors")

    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500.0, 500.0]), torch.randn(2, 16, 384, generator=g)

    base = UNet2DConditionModel.from_pretrained(folder).eval()
    one, two, fused = (copy.deepcopy(base) for _ in range(3))
    inject(one, LoRA.from_file(files[0], one, name="a"))
    for model in (two, fused):
        for name, path in zip("ab", files, strict=True):
            inject(model, LoRA.from_file(path, model, name=name))
        set_weights(model, {"a": 0.7, "b": 0.4})
    fuse(fused)

    ref_base = RefUNet.from_pretrained(folder).eval()
    ref_one, ref_two = RefUNet.from_pretrained(folder).eval(), RefUNet.from_pretrained(folder).eval()
    ref_one.load_lora_adapter(str(files[0]), prefix="unet", adapter_name="a")
    for name, path in zip("ab", files, strict=True):
        ref_two.load_lora_adapter(str(path), prefix="unet", adapter_name=name)
    ref_two.set_adapters(["a", "b"], [0.7, 0.4])

    def ours(model: torch.nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: model(x, t, context)

    def ref(model: RefUNet) -> Callable[[], torch.Tensor]:
        return lambda: model(x, t, context).sample

    rows = {
        "no LoRA": (ours(base), ref(ref_base)),
        "one adapter, unfused": (ours(one), ref(ref_one)),
        "two adapters (0.7, 0.4), unfused": (ours(two), ref(ref_two)),
        "two adapters, fused": (ours(fused), None),
    }
    times: dict[str, list[list[float]]] = {name: [[], []] for name in rows}
    with torch.inference_mode():
        for name, (a, b) in rows.items():
            if b is not None:
                diff = (a() - b()).abs().max().item()
                assert diff < 1e-4, (name, diff)
        for _ in range(args.repeats):
            for name, pair in rows.items():
                for i, call in enumerate(pair):
                    if call is not None:
                        start = time.perf_counter()
                        call()
                        times[name][i].append(time.perf_counter() - start)
    base_ms = statistics.median(times["no LoRA"][0]) * 1e3
    print(f"| workload | ours ms | vs no LoRA | diffusers ms | ours / diffusers |  (rank {args.rank}, {args.threads} thread(s))")
    for name, (mine, theirs) in times.items():
        m = statistics.median(mine) * 1e3
        r = f"{statistics.median(theirs) * 1e3:.1f}" if theirs else "-"
        ratio = f"{m / (statistics.median(theirs) * 1e3):.2f}" if theirs else "-"
        print(f"| {name} | {m:.1f} | {m - base_ms:+.1f} ms ({m / base_ms:.2f}x) | {r} | {ratio} |")


if __name__ == "__main__":
    main()
