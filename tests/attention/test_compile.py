"""attention() under torch.compile: one graph for SDPA, and selection changes recompile."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from diffblocks.components.attention import (
    attention,
    attention_backend,
    attention_checks,
    reset_attention_backend,
    set_attention_backend,
)
from tests.attention.attention_helpers import marker_of, qkv


def _call(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    return attention(q, k, v, mask=mask) + attention(q, k, v, is_causal=True)


def _inputs() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    q, k, v = qkv()
    mask = torch.rand(2, 1, 6, 7) > 0.3
    mask[..., 0] = True
    return q, k, v, mask


@pytest.mark.parametrize("name", ["sdpa", "sdpa_math", "sdpa_flash", "reference"])
def test_fullgraph_compiles_and_matches_eager(name: str) -> None:
    inputs = _inputs()
    with attention_backend(name):
        eager = _call(*inputs)
        compiled = torch.compile(_call, fullgraph=True, backend="eager")(*inputs)
    assert (compiled - eager).abs().max() < 1e-6


def test_aot_eager_fullgraph_with_checks_mode() -> None:
    inputs = _inputs()
    with attention_checks():
        compiled = torch.compile(_call, fullgraph=True, backend="aot_eager")(*inputs)
    assert (compiled - _call(*inputs)).abs().max() < 1e-6


def test_flex_traces_in_place_under_compile() -> None:
    q, k, v, mask = _inputs()
    bias = torch.randn(2, 1, 6, 7)

    def call(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attention(q, k, v, mask=mask) + attention(q, k, v, mask=bias)

    with attention_backend("flex"):
        compiled = torch.compile(call, fullgraph=True, backend="eager")(q, k, v)
    with attention_backend("reference"):
        expected = call(q, k, v)
    assert (compiled - expected).abs().max() < 1e-5


def test_a_new_selection_recompiles_instead_of_reusing_the_graph() -> None:
    q, k, v = qkv()

    def call(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attention(q, k, v) * 1.0

    compiled = torch.compile(call, fullgraph=True, backend="eager")
    with attention_backend("test_marker_one"):
        assert marker_of(compiled(q, k, v)) == 1.0
    with attention_backend("test_marker_two"):
        assert marker_of(compiled(q, k, v)) == 2.0
    assert (compiled(q, k, v) - attention(q, k, v)).abs().max() < 1e-6


class Block(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return attention(x, x, x) + 0.0


def test_per_model_backends_hold_inside_compiled_models() -> None:
    first, second = Block(), Block()
    set_attention_backend(first, "test_marker_one")
    set_attention_backend(second, "test_marker_two")
    x = torch.randn(1, 2, 4, 8)
    compiled_first = torch.compile(first, fullgraph=True, backend="eager")
    compiled_second = torch.compile(second, fullgraph=True, backend="eager")
    for _ in range(2):  # alternate: each call must see its own model's backend
        assert marker_of(compiled_first(x)) == 1.0
        assert marker_of(compiled_second(x)) == 2.0
    reset_attention_backend(first)
    assert (compiled_first(x) - attention(x, x, x)).abs().max() < 1e-6
