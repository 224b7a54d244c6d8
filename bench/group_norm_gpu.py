"""GroupNorm + SiLU at the SDXL VAE decoder's and the UNets' shapes: PyTorch's kernel against split forms (GPU).

The eager VAE decode at 1024² spent half its time in GroupNorm statistics (docs/benchmarks.md):
PyTorch reduces each (sample, group) row in one thread block, so at batch 1 only 32 blocks run.
This times, per shape, in one process (CUDA-event medians):

    native     F.group_norm then F.silu (what PyTorch's own module runs)
    one-pass   torch.var_mean in the input's dtype, then a scale-and-shift in that dtype and the SiLU
    ours       diffblocks' split_group_norm (float32 mean and variance, then batch norm's inference
               kernel over at least 512 pieces), then the SiLU: what our GroupNorm runs for long rows
    compiled   torch.compile of the native pair (what inductor makes of it)

and each candidate's max-abs difference to a float64 computation of the same input, whose values
are normal with standard deviation 3 around ``--offset``.

Run: python bench/group_norm_gpu.py [--dtype float16] [--offset 1] [--shapes decoder,unet]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from cuda_timing import time_ms
from torch import Tensor

from diffblocks.components.models.layers.norm import SPLIT_MIN_ROW, split_group_norm

GROUPS = 32
# (batch, channels, side, calls per forward). Decoder: for a 1024² image from 128² latents, the mid
# block (two ResNets and the attention's norm), three ResNets per up block, and the output norm.
# UNets (CFG batch 2): the widest activation of each level of SDXL at 1024² and SD1.5 at 512².
SHAPES = {
    "decoder": [
        (1, 512, 128, 11), (1, 512, 256, 6), (1, 512, 512, 1), (1, 256, 512, 5), (1, 256, 1024, 1), (1, 128, 1024, 6)
    ],
    "unet": [(2, 320, 128, 0), (2, 640, 64, 0), (2, 1280, 32, 0), (2, 320, 64, 0), (2, 640, 32, 0), (2, 1280, 16, 0), (2, 1280, 8, 0)],
}
EPS = 1e-6


def native(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return F.silu(F.group_norm(x, GROUPS, weight, bias, EPS))


def one_pass(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    n, c = x.shape[:2]
    var, mean = torch.var_mean(x.view(n, GROUPS, -1), dim=-1, correction=0, keepdim=True)
    rstd = torch.rsqrt(var.float() + EPS)
    scale = rstd * weight.float().view(1, GROUPS, -1)
    shift = bias.float().view(1, GROUPS, -1) - mean.float() * scale
    scale, shift = scale.reshape(n, c, 1, 1).to(x.dtype), shift.reshape(n, c, 1, 1).to(x.dtype)
    return F.silu(torch.addcmul(shift, x, scale))


def ours(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return F.silu(split_group_norm(x, GROUPS, weight=weight, bias=bias, eps=EPS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--offset", type=float, default=1.0, help="mean of the inputs (their std is 3)")
    parser.add_argument("--shapes", default="decoder,unet")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {dtype}, inputs N({args.offset}, 3²)")
    candidates = {"native": native, "one-pass": one_pass, "ours": ours, "compiled": native}
    for shape_set in args.shapes.split(","):
        totals = dict.fromkeys(candidates, 0.0)
        header = " | ".join(f"{name} ms (max diff)" for name in candidates)
        print(f"\n| {shape_set} shape | row ≥ {SPLIT_MIN_ROW} | calls | {header} |")
        print("|---|---|---|" + "---|" * len(candidates))
        for batch, channels, side, calls in SHAPES[shape_set]:
            g = torch.Generator("cuda").manual_seed(0)
            x = torch.randn(batch, channels, side, side, device="cuda", dtype=dtype, generator=g) * 3 + args.offset
            weight = torch.rand(channels, device="cuda", dtype=dtype, generator=g) + 0.5
            bias = torch.randn(channels, device="cuda", dtype=dtype, generator=g)
            # one fresh compile per shape: a shared one would hit dynamo's recompile limit and fall back to eager
            torch._dynamo.reset()
            candidates["compiled"] = torch.compile(native, dynamic=False)
            with torch.inference_mode():
                want = native(x.double(), weight.double(), bias.double())
                cells = []
                for name, fn in candidates.items():
                    diff = (fn(x, weight, bias).double() - want).abs().max().item()
                    ms = time_ms(lambda fn=fn: fn(x, weight, bias), repeat=20)
                    totals[name] += ms * calls
                    cells.append(f"{ms:.3f} ({diff:.1e})")
            long_rows = channels // GROUPS * side * side >= SPLIT_MIN_ROW
            shape = f"{batch}x{channels}x{side}x{side}"
            print(f"| {shape} | {'yes' if long_rows else 'no'} | {calls or ''} | " + " | ".join(cells) + " |", flush=True)
        if any(calls for *_, calls in SHAPES[shape_set]):
            print(f"| all {shape_set} norms | | | " + " | ".join(f"{totals[name]:.1f}" for name in candidates) + " |")


if __name__ == "__main__":
    main()
