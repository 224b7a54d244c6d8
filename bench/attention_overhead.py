"""Overhead of the attention seam vs calling F.scaled_dot_product_attention directly.

Tiny CPU tensors, so the kernel is as cheap as it gets and the dispatch cost is visible. The
candidates are timed in interleaved rounds and the best round of each is kept, which keeps
noise from a busy machine out of the comparison. A no-op backend isolates the seam's own cost
(function call, one context-variable read, the backend call) from the kernel's.
Run: python bench/attention_overhead.py [--calls 20000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

import torch
import torch.nn.functional as F

from typing import final

from torch import Tensor

from diffblocks.components.attention import (
    ANY_DEVICE,
    AbstractAttentionBackend,
    DeviceSupport,
    attention,
    attention_backend,
    register_attention_backend,
)
from diffblocks.components.attention.support import FLOAT_DTYPES


@final
@register_attention_backend
class NoopBackend(AbstractAttentionBackend):
    """Returns q: what remains of a call's time is the seam's own."""

    name = "bench_noop"
    support = {ANY_DEVICE: DeviceSupport(dtypes=FLOAT_DTYPES)}

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float | None, is_causal: bool
    ) -> Tensor:
        return q


def noop(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return q


def best_times(candidates: dict[str, Callable[[], object]], *, calls: int, rounds: int) -> dict[str, float]:
    """Seconds per call of each candidate: the best of ``rounds`` interleaved runs of ``calls`` calls."""
    for fn in candidates.values():
        fn()  # warm-up
    best = {name: float("inf") for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            best[name] = min(best[name], timeit.timeit(fn, number=calls) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description="attention() dispatch overhead on tiny CPU tensors")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    q, k, v = (torch.randn(1, 1, 4, 8) for _ in range(3))

    def direct() -> object:
        return F.scaled_dot_product_attention(q, k, v)

    def seam() -> object:
        return attention(q, k, v)

    def direct_noop() -> object:
        return noop(q, k, v)

    with torch.inference_mode():
        with attention_backend("sdpa"):
            times = best_times({"direct": direct, "seam": seam}, calls=args.calls, rounds=args.rounds)
        with attention_backend("bench_noop"):
            noops = best_times({"direct": direct_noop, "seam": seam}, calls=args.calls, rounds=args.rounds)

    extra = times["seam"] - times["direct"]
    own = noops["seam"] - noops["direct"]
    print(f"F.scaled_dot_product_attention  {times['direct'] * 1e6:7.2f} us/call")
    print(f"attention() (sdpa)              {times['seam'] * 1e6:7.2f} us/call  (+{extra * 1e6:.2f} us)")
    print(f"seam's own cost (no-op kernel)  {own * 1e6:7.2f} us/call")
    print(f"ratio attention() / direct: {times['seam'] / times['direct']:.3f}")


if __name__ == "__main__":
    main()
