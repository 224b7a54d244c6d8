"""Every CPU-capable backend against the plain reference implementation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from diffblocks.components.attention import (
    AttentionBackendName,
    attention,
    attention_backend,
    get_attention_backend,
)
from diffblocks.components.attention.backends import AutoBackend
from tests.attention.attention_helpers import qkv

CPU_BACKENDS = ["sdpa", "sdpa_math", "sdpa_flash", "flex", "auto", "reference"]


def _reference(
    q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, scale: float | None = None, is_causal: bool = False
) -> Tensor:
    with attention_backend("reference"):
        return attention(q, k, v, mask=mask, scale=scale, is_causal=is_causal)


def _textbook(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ / √d + mask) v in float64, written independently of every backend."""
    scores = q.double() @ k.double().transpose(-2, -1) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores + mask.double()
    return (scores.softmax(-1) @ v.double()).float()


def _masks(q: Tensor, k: Tensor) -> dict[str, Tensor]:
    batch, _, seq_q, _ = q.shape
    keep = torch.rand(batch, 1, seq_q, k.shape[2]) > 0.4
    keep[..., 0] = True  # no query row may lose every key
    return {"bool": keep, "additive": torch.randn(batch, 1, seq_q, k.shape[2]), "key_padding": keep[:, :, :1, :]}


def test_reference_matches_the_textbook_formula() -> None:
    q, k, v = qkv()
    bias = torch.randn(2, 1, 6, 7)
    assert (_reference(q, k, v) - _textbook(q, k, v)).abs().max() < 1e-5
    assert (_reference(q, k, v, mask=bias) - _textbook(q, k, v, bias)).abs().max() < 1e-5


def test_reference_zeroes_rows_that_see_no_key_like_sdpa() -> None:
    q, k, v = qkv(batch=1)
    keep = torch.ones(1, 1, 6, 7, dtype=torch.bool)
    keep[..., 2, :] = False
    out = _reference(q, k, v, mask=keep)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert (out - attention(q, k, v, mask=keep)).abs().max() < 1e-5


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_backend_matches_reference(name: str) -> None:
    q, k, v = qkv(seq_q=6, seq_k=7)
    cases: dict[str, tuple[Tensor | None, float | None, bool]] = {
        "plain": (None, None, False),
        "scale": (None, 0.3, False),
        "causal": (None, None, True),
        **{f"mask_{kind}": (mask, None, False) for kind, mask in _masks(q, k).items()},
    }
    diffs: dict[str, float] = {}
    for case, (mask, scale, is_causal) in cases.items():
        with attention_backend(name):
            out = attention(q, k, v, mask=mask, scale=scale, is_causal=is_causal)
        diffs[case] = (out - _reference(q, k, v, mask=mask, scale=scale, is_causal=is_causal)).abs().max().item()
    assert max(diffs.values()) < 1e-5, diffs


@pytest.mark.parametrize("name", ["sdpa", "sdpa_math", "reference"])
def test_value_head_dim_may_differ(name: str) -> None:
    q, k, v = qkv(head_dim=8, head_dim_v=4)
    with attention_backend(name):
        out = attention(q, k, v)
    assert out.shape == (2, 3, 6, 4)
    assert (out - _textbook(q, k, v)).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["sdpa", "sdpa_math", "sdpa_flash"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_tolerance(name: str, dtype: torch.dtype) -> None:
    q, k, v = qkv(dtype=dtype)
    with attention_backend(name):
        out = attention(q, k, v, is_causal=True)
    assert out.dtype == dtype
    assert (out.float() - _reference(q.float(), k.float(), v.float(), is_causal=True)).abs().max() < 2e-2


def test_reference_keeps_float64() -> None:
    q, k, v = qkv(dtype=torch.float64)
    out = _reference(q, k, v)
    assert out.dtype == torch.float64
    assert (out - attention(q, k, v)).abs().max() < 1e-12


def test_auto_falls_back_to_sdpa_on_cpu() -> None:
    q, k, v = qkv()
    auto = get_attention_backend(AttentionBackendName.AUTO)
    assert isinstance(auto, AutoBackend)
    assert auto.choose(q, k, v, mask=None, is_causal=False).name == "sdpa"  # flash-attn never runs on CPU
    with attention_backend("auto"):
        chosen = attention(q, k, v)
    assert torch.equal(chosen, attention(q, k, v))


def test_declared_support_is_consistent_with_cpu_reality() -> None:
    """A backend declaring CPU support runs there; one declaring none says so by name."""
    q, k, v = qkv()
    assert get_attention_backend("sdpa_flash").unsupported_reasons(q, k, v, mask=None, is_causal=False) == []
    reasons = get_attention_backend("sdpa_efficient").unsupported_reasons(q, k, v, mask=None, is_causal=False)
    assert reasons == ["device type 'cpu' is not supported (supported: cuda)"]
    flash = get_attention_backend("sdpa_flash")
    v_narrow = v[..., :4]
    assert flash.unsupported_reasons(q, k, v_narrow, mask=None, is_causal=False) == [
        "v head_dim 4 must equal the q/k head_dim 8"
    ]
