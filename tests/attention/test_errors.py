"""Failures that teach: missing packages, unsupported calls, and checks-mode validation."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
from torch import nn

from diffblocks.components.attention import (
    AttentionBackendUnavailableError,
    AttentionInputError,
    UnsupportedAttentionError,
    attention,
    attention_backend,
    attention_checks,
    attention_checks_enabled,
    current_attention_backend,
    get_attention_backend,
    model_attention_backend,
    set_attention_backend,
)
from diffblocks.components.attention.registry import backend_instance
from tests.attention.attention_helpers import qkv

MISSING = {
    "flash_attn_2": ("flash_attn", "needs the package flash-attn: pip install flash-attn"),
    "flash_attn_3": ("flash_attn_interface", "needs the package flash-attn-3 (flash_attn_interface): build it from"),
    "sageattention": ("sageattention", "needs the package sageattention: pip install sageattention"),
    "xformers": ("xformers", "needs the package xformers: pip install xformers"),
}


@pytest.mark.parametrize("name", sorted(MISSING))
def test_missing_package_fails_by_name_with_the_install_hint(name: str) -> None:
    module, hint = MISSING[name]
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    expected = f"attention backend '{name}' {hint}"
    with pytest.raises(AttentionBackendUnavailableError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        with attention_backend(name):
            pass
    model = nn.Linear(2, 2)
    with pytest.raises(AttentionBackendUnavailableError) as info:
        set_attention_backend(model, name)
    assert str(info.value).startswith(expected) and isinstance(info.value, ImportError)
    assert model_attention_backend(model) is None and not model._forward_pre_hooks  # nothing half-installed
    assert current_attention_backend().name == "sdpa"


def test_the_flash_attn_2_message_is_exact() -> None:
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here")
    with pytest.raises(AttentionBackendUnavailableError) as info:
        get_attention_backend("flash_attn_2")
    assert str(info.value) == "attention backend 'flash_attn_2' needs the package flash-attn: pip install flash-attn"


def test_optional_packages_are_not_imported_until_asked_for() -> None:
    assert not {"flash_attn", "flash_attn_interface", "sageattention", "xformers"} & set(sys.modules)


@pytest.mark.parametrize("name", ["flash_attn_2", "flash_attn_3", "sageattention"])
def test_kernels_without_masks_refuse_a_mask_before_importing_anything(name: str) -> None:
    """Silently dropping a mask would change the result, so it is refused up front."""
    q, k, v = qkv()
    target = backend_instance(name)
    with pytest.raises(UnsupportedAttentionError, match=f"attention backend '{name}' cannot run this call"):
        target.forward(q, k, v, mask=torch.ones(1, 1, 6, 7, dtype=torch.bool), scale=None, is_causal=False)
    with pytest.raises(UnsupportedAttentionError, match="device type 'cpu' is not supported"):
        target.forward(q, k, v, mask=None, scale=None, is_causal=True)  # causal with seq_q 6 != seq_k 7
    assert target.requirement is not None and target.requirement.module not in sys.modules


@pytest.mark.filterwarnings("ignore:.*kernel not used because:UserWarning")
def test_forced_kernel_failure_is_explained_without_checks_mode() -> None:
    q, k, v = qkv()
    with attention_backend("sdpa_efficient"), pytest.raises(UnsupportedAttentionError) as info:
        attention(q, k, v)
    message = str(info.value)
    assert "attention backend 'sdpa_efficient' cannot run this call" in message
    assert "device type 'cpu' is not supported (supported: cuda)" in message
    assert "the kernel raised RuntimeError" in message
    assert isinstance(info.value.__cause__, RuntimeError)


def test_unexplained_kernel_errors_pass_through_unchanged() -> None:
    q, k, v = qkv()
    with pytest.raises(RuntimeError) as info:
        attention(q, k[:, :, :, :5], v)  # head_dim mismatch: torch's own message is the clear one
    assert not isinstance(info.value, UnsupportedAttentionError)


def test_checks_mode_is_off_by_default_and_scoped() -> None:
    assert not attention_checks_enabled()
    with attention_checks():
        assert attention_checks_enabled()
        with attention_checks(enabled=False):
            assert not attention_checks_enabled()
    assert not attention_checks_enabled()


def test_checks_mode_reports_every_problem_at_once() -> None:
    q, _, v = qkv()
    k = torch.randn(2, 4, 5, 4, dtype=torch.float64)
    with attention_checks(), pytest.raises(AttentionInputError) as info:
        attention(q, k, v, mask=torch.ones(3, 3, dtype=torch.bool), is_causal=True)
    assert str(info.value) == (
        "6 attention input errors (backend 'sdpa'):\n"
        "  - q, k and v must share one dtype, got q torch.float32, k torch.float64, v torch.float32\n"
        "  - head counts differ: q 3, k 4, v 3 (grouped-query attention is not supported: repeat k and v along heads first)\n"
        "  - q head_dim 8 must equal k head_dim 4\n"
        "  - k and v sequence lengths differ: k 5, v 7\n"
        "  - mask shape (3, 3) does not broadcast to (batch, heads, seq_q, seq_k) = (2, 3, 6, 5)\n"
        "  - pass either mask or is_causal=True, not both (fold the causal mask into mask)"
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("device", "q, k and v must be on one device, got q cpu, k meta, v cpu"),
        ("rank", "k must be 4-D (batch, heads, seq, head_dim), got shape (3, 7, 8)"),
        ("mask_dtype", "mask must be bool (True = attend) or q's dtype torch.float32 (additive), got torch.float16"),
        ("mask_device", "mask is on meta but q is on cpu"),
        ("batch", "batch sizes differ: q 2, k 1, v 2"),
        ("scale", "scale must be a finite number, got nan"),
    ],
)
def test_checks_mode_messages(change: str, expected: str) -> None:
    q, k, v = qkv()
    mask, scale = None, None
    if change == "device":
        k = k.to("meta")
    elif change == "rank":
        k = k[0]
    elif change == "mask_dtype":
        mask = torch.zeros(6, 7, dtype=torch.float16)
    elif change == "mask_device":
        mask = torch.ones(6, 7, dtype=torch.bool, device="meta")
    elif change == "batch":
        k = k[:1]
    elif change == "scale":
        scale = float("nan")
    with attention_checks(), pytest.raises(AttentionInputError, match="attention input error") as info:
        attention(q, k, v, mask=mask, scale=scale)
    assert expected in str(info.value).splitlines()[1]


def test_checks_mode_reports_declared_support_before_the_kernel_runs() -> None:
    q, k, v = qkv(head_dim_v=4)
    with attention_checks(), attention_backend("sdpa_flash"), pytest.raises(UnsupportedAttentionError) as info:
        attention(q, k, v)
    assert "v head_dim 4 must equal the q/k head_dim 8" in str(info.value)
    assert "the kernel raised" not in str(info.value)


def test_checks_mode_passes_valid_calls_through_unchanged() -> None:
    q, k, v = qkv()
    mask = torch.rand(2, 1, 1, 7) > 0.2
    mask[..., 0] = True
    with attention_checks():
        checked = attention(q, k, v, mask=mask)
    assert torch.equal(checked, attention(q, k, v, mask=mask))


def test_an_xformers_build_for_another_torch_is_refused_when_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    """xFormers imports without its compiled kernels when built for another torch; every call would then fail."""
    package, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    package._has_cpp_library = False  # type: ignore[attr-defined]
    package.ops = ops  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    expected = r"xformers: a build for torch .* \(the installed one's compiled kernels did not load"
    with pytest.raises(AttentionBackendUnavailableError, match=expected):
        with attention_backend("xformers"):
            pass
    assert current_attention_backend().name == "sdpa"


@pytest.mark.parametrize("name", ["sdpa", "sdpa_math", "flex", "reference", "auto"])
def test_a_mask_with_is_causal_is_refused_by_every_backend(name: str) -> None:
    """Some kernels would apply both and some only the mask: the pair is refused before any kernel runs."""
    q, k, v = qkv(seq_k=6)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    with attention_backend(name), pytest.raises(AttentionInputError, match="not both"):
        attention(q, k, v, mask=mask, is_causal=True)


def test_fused_kernels_refuse_a_strided_head_dim_before_running() -> None:
    """SDPA's fused kernels read each head's vector as one row: a strided head_dim is refused, not run."""
    q, k, v = qkv(seq_k=6)
    v = torch.randn(*v.shape[:-1], 2 * v.shape[-1])[..., ::2]  # every second element: stride 2 along head_dim
    with attention_checks(), attention_backend("sdpa_flash"), pytest.raises(UnsupportedAttentionError) as info:
        attention(q, k, v)
    assert "v must have stride 1 along head_dim with this kernel (pass .contiguous())" in str(info.value)
    with attention_backend("sdpa"):
        torch.testing.assert_close(attention(q, k, v), attention(q, k, v.contiguous()))  # the default copes
