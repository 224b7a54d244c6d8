"""Run every attention backend available on this CUDA machine against the reference backend.

For each backend and case it prints the max-abs difference to ``reference``, the time per call
through ``attention()``, and whether the outcome agrees with the backend's declared support:

    ok            declared supported, ran, within tolerance
    refused       declared unsupported, and the call failed with our message (as it should)
    ok*           declared unsupported, yet ran within tolerance (the declaration is too cautious)
    WRONG         ran but differs from the reference by more than the tolerance, returned the
                  wrong shape, or modified its inputs
    FAILED        declared supported, yet the kernel raised
    not installed the backend's optional package is missing

Run: python bench/attention_gpu_check.py [--backends sdpa,flex] [--cases cross,causal] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import asdict, dataclass

import torch
from cuda_timing import time_ms
from torch import Tensor

from diffblocks.components.attention import (
    AttentionBackendUnavailableError,
    UnsupportedAttentionError,
    attention,
    attention_backend,
    attention_backend_names,
)
from diffblocks.components.attention.registry import backend_instance

# max-abs tolerance vs the float32 reference, for exact kernels; approximate ones get 10x
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Case:
    """One attention call: shapes, dtype, mask kind ("none", "bool", "padding", "additive"), causal."""

    name: str
    batch: int
    heads: int
    seq_q: int
    seq_k: int
    head_dim: int
    dtype: torch.dtype
    mask: str = "none"
    causal: bool = False
    head_dim_v: int | None = None

    def inputs(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        gen = torch.Generator(device=device).manual_seed(0)

        def randn(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=gen, device=device, dtype=self.dtype)

        q = randn(self.batch, self.heads, self.seq_q, self.head_dim)
        k = randn(self.batch, self.heads, self.seq_k, self.head_dim)
        v = randn(self.batch, self.heads, self.seq_k, self.head_dim_v or self.head_dim)
        mask: Tensor | None = None
        if self.mask == "bool":
            mask = torch.rand(self.batch, 1, self.seq_q, self.seq_k, generator=gen, device=device) > 0.3
            mask[..., 0] = True
        elif self.mask == "padding":  # text-encoder style: the last keys of each prompt are padding
            mask = torch.ones(self.batch, 1, 1, self.seq_k, dtype=torch.bool, device=device)
            mask[..., self.seq_k // 2 :] = False
        elif self.mask == "additive":
            mask = randn(self.batch, 1, self.seq_q, self.seq_k)
        return q, k, v, mask


CASES = [
    Case("self_d64_fp16", 2, 10, 4096, 4096, 64, torch.float16),
    Case("self_d64_bf16", 2, 10, 4096, 4096, 64, torch.bfloat16),
    Case("self_d128_bf16", 1, 24, 4096, 4096, 128, torch.bfloat16),
    Case("cross_77_fp16", 2, 10, 4096, 77, 64, torch.float16),
    Case("padding_mask_fp16", 2, 8, 1024, 77, 64, torch.float16, mask="padding"),
    Case("bool_mask_bf16", 2, 8, 1024, 1024, 64, torch.bfloat16, mask="bool"),
    Case("additive_mask_fp16", 2, 8, 1024, 1024, 64, torch.float16, mask="additive"),
    Case("causal_bf16", 2, 8, 1024, 1024, 64, torch.bfloat16, causal=True),
    Case("causal_unequal_bf16", 2, 8, 512, 1024, 64, torch.bfloat16, causal=True),
    Case("keys_1000_fp16", 2, 8, 1024, 1000, 64, torch.float16),
    Case("d256_bf16", 1, 8, 1024, 1024, 256, torch.bfloat16),
    Case("value_dim_32_fp16", 2, 8, 1024, 1024, 64, torch.float16, head_dim_v=32),
    Case("self_d64_fp32", 2, 8, 1024, 1024, 64, torch.float32),
]


@dataclass
class Row:
    backend: str
    case: str
    status: str
    max_abs: float | None = None
    ms: float | None = None
    note: str = ""


def check(name: str, case: Case, device: torch.device, *, warmup: int, iters: int) -> Row:
    backend = backend_instance(name)
    if not backend.is_installed():
        return Row(name, case.name, "not installed")
    q, k, v, mask = case.inputs(device)
    declared = not backend.unsupported_reasons(q, k, v, mask=mask, is_causal=case.causal)
    with attention_backend("reference"):
        expected = attention(q, k, v, mask=mask, is_causal=case.causal).float()

    def call() -> Tensor:
        return attention(q, k, v, mask=mask, is_causal=case.causal)

    originals = [t.clone() for t in (q, k, v)]

    try:
        with attention_backend(name):
            out = call()
            torch.cuda.synchronize()
            ms = time_ms(call, warmup=warmup, repeat=iters)
    except (UnsupportedAttentionError, AttentionBackendUnavailableError) as error:
        first = str(error).splitlines()[1].strip("- ") if "\n" in str(error) else str(error)
        return Row(name, case.name, "refused" if not declared else "FAILED", note=first)
    except Exception as error:  # a kernel's own failure, e.g. out of memory
        torch.cuda.empty_cache()
        return Row(name, case.name, "FAILED" if declared else "refused", note=f"{type(error).__name__}: {error}"[:120])
    if any(not torch.equal(before, after) for before, after in zip(originals, (q, k, v))):
        return Row(name, case.name, "WRONG", ms=ms, note="the kernel modified q, k or v in place")
    if out.shape != expected.shape:
        return Row(name, case.name, "WRONG", ms=ms, note=f"output shape {tuple(out.shape)}, expected {tuple(expected.shape)}")
    max_abs = (out.float() - expected).abs().max().item()
    tolerance = TOLERANCE[case.dtype] * (1 if backend.exact else 10)
    if max_abs > tolerance:
        status = "WRONG"
    else:
        status = "ok" if declared else "ok*"
    return Row(name, case.name, status, max_abs, ms, "" if backend.exact else "approximate kernel")


def main() -> None:
    parser = argparse.ArgumentParser(description="attention backends on CUDA vs the reference")
    parser.add_argument("--backends", default="", help="comma-separated names (default: all registered)")
    parser.add_argument("--cases", default="", help="comma-separated substrings of case names (default: all)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args()
    # forced SDPA kernels explain through torch warnings why they cannot run; our refusal says it
    warnings.filterwarnings("ignore", category=UserWarning, module="diffblocks.components.attention.backends.sdpa")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    device = torch.device("cuda")
    names = [n for n in args.backends.split(",") if n] or [n for n in attention_backend_names() if n != "reference"]
    cases = [c for c in CASES if not args.cases or any(s in c.name for s in args.cases.split(","))]
    capability = "sm{}{}".format(*torch.cuda.get_device_capability(device))
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)} ({capability})")

    print(f"| {'backend':<15} | {'case':<20} | {'status':<13} | {'max|diff|':>9} | {'ms':>8} | note")
    rows: list[Row] = []
    for name in names:
        for case in cases:
            row = check(name, case, device, warmup=args.warmup, iters=args.iters)
            rows.append(row)
            diff = "" if row.max_abs is None else f"{row.max_abs:.2e}"
            ms = "" if row.ms is None else f"{row.ms:.3f}"
            print(f"| {row.backend:<15} | {row.case:<20} | {row.status:<13} | {diff:>9} | {ms:>8} | {row.note}", flush=True)
            if row.status == "not installed":
                break
    bad = [r for r in rows if r.status in ("WRONG", "FAILED")]
    print(f"{len(rows)} checks, {len(bad)} WRONG or FAILED")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
