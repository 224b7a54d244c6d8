"""GroupNorm + SiLU at the SDXL VAE decoder's shapes: PyTorch's kernel against candidates (GPU).

The eager VAE decode at 1024² spends half its time in GroupNorm statistics (docs/benchmarks.md):
PyTorch reduces each (sample, group) row in one thread block, so at batch 1 only 32 blocks run.
This times, per shape, in one process (CUDA-event medians):

    native     F.group_norm then F.silu (what the models run today)
    split      statistics by torch.var_mean, whose reduction spreads a long row over many blocks,
               then one fused scale-and-shift and the SiLU
    compiled   torch.compile of the native pair (what inductor makes of it)

and each candidate's max-abs difference to a float32 computation of the same input.

Run: python bench/group_norm_gpu.py [--dtype float16]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from cuda_timing import time_ms
from torch import Tensor

GROUPS, EPS = 32, 1e-6
# (channels, side, count) of the decoder's norms for a 1024² image from 128² latents: the mid block
# (two ResNets and the attention's norm), three ResNets per up block, and the output norm.
SHAPES = [(512, 128, 11), (512, 256, 6), (512, 512, 1), (256, 512, 5), (256, 1024, 1), (128, 1024, 6)]


def native(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return F.silu(F.group_norm(x, GROUPS, weight, bias, EPS))


def split(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    n, c = x.shape[:2]
    var, mean = torch.var_mean(x.view(n, GROUPS, -1), dim=-1, correction=0, keepdim=True)
    rstd = torch.rsqrt(var.float() + EPS)
    scale = rstd * weight.float().view(1, GROUPS, -1)
    shift = bias.float().view(1, GROUPS, -1) - mean.float() * scale
    scale, shift = scale.reshape(n, c, 1, 1).to(x.dtype), shift.reshape(n, c, 1, 1).to(x.dtype)
    return F.silu(torch.addcmul(shift, x, scale))


def reference(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return native(x.float(), weight.float(), bias.float())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    dtype = getattr(torch, parser.parse_args().dtype)
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {dtype}")
    compiled = torch.compile(native, dynamic=False)
    candidates = {"native": native, "split": split, "compiled": compiled}
    totals = dict.fromkeys(candidates, 0.0)
    print("| shape | calls | " + " | ".join(f"{name} ms (max diff)" for name in candidates) + " |")
    print("|---|---|" + "---|" * len(candidates))
    for channels, side, calls in SHAPES:
        g = torch.Generator("cuda").manual_seed(0)
        x = torch.randn(1, channels, side, side, device="cuda", dtype=dtype, generator=g) * 3 + 1
        weight = torch.rand(channels, device="cuda", dtype=dtype, generator=g) + 0.5
        bias = torch.randn(channels, device="cuda", dtype=dtype, generator=g)
        with torch.inference_mode():
            want = reference(x, weight, bias)
            cells = []
            for name, fn in candidates.items():
                diff = (fn(x, weight, bias).float() - want).abs().max().item()
                ms = time_ms(lambda fn=fn: fn(x, weight, bias), repeat=20)
                totals[name] += ms * calls
                cells.append(f"{ms:.3f} ({diff:.1e})")
        print(f"| 1x{channels}x{side}x{side} | {calls} | " + " | ".join(cells) + " |", flush=True)
    print("| all decoder norms | | " + " | ".join(f"{totals[name]:.1f}" for name in candidates) + " |")


if __name__ == "__main__":
    main()
