"""Backend selection: context manager > per-model hooks > environment > "sdpa", all by value."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from diffblocks.components.attention import (
    AttentionBackendName,
    attention,
    attention_backend,
    attention_backend_names,
    current_attention_backend,
    model_attention_backend,
    reset_attention_backend,
    set_attention_backend,
)
from diffblocks.components.attention._state import backend_from_env, checks_from_env
from tests.attention.attention_helpers import marker_of, qkv


class Probe(nn.Module):
    """Records which backend its forward saw, and returns the attention output."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.seen: list[str] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(current_attention_backend().name)
        return attention(x, x, x)


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Probe()
        self.seen: list[str] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(current_attention_backend().name)
        return self.inner(x)


def _x() -> Tensor:
    return torch.randn(1, 2, 4, 8)


def test_default_is_sdpa() -> None:
    assert os.environ.get("DIFFBLOCKS_ATTENTION_BACKEND") is None
    assert current_attention_backend().name == "sdpa"


def test_context_manager_nests_and_restores() -> None:
    with attention_backend("sdpa_math") as outer:
        assert outer.name == current_attention_backend().name == "sdpa_math"
        with attention_backend(AttentionBackendName.REFERENCE):
            assert current_attention_backend().name == "reference"
        assert current_attention_backend().name == "sdpa_math"
    assert current_attention_backend().name == "sdpa"


def test_context_manager_restores_after_an_exception() -> None:
    with pytest.raises(RuntimeError, match="boom"), attention_backend("reference"):
        raise RuntimeError("boom")
    assert current_attention_backend().name == "sdpa"


def test_context_manager_selects_the_kernel_that_runs() -> None:
    q, k, v = qkv()
    with attention_backend("test_marker_one"):
        assert marker_of(attention(q, k, v)) == 1.0
    assert math.isnan(marker_of(attention(q, k, v)))  # outside the block a real kernel runs


def test_per_model_backend_applies_only_during_its_forward() -> None:
    first, second = Probe(), Probe()
    set_attention_backend(first, "sdpa_math")
    set_attention_backend(second, AttentionBackendName.REFERENCE)
    first(_x())
    second(_x())
    assert first.seen == ["sdpa_math"] and second.seen == ["reference"]
    assert current_attention_backend().name == "sdpa"
    assert model_attention_backend(first) == "sdpa_math"


def test_context_manager_beats_per_model() -> None:
    model = Probe()
    set_attention_backend(model, "sdpa_math")
    with attention_backend("reference"):
        model(_x())
    model(_x())
    assert model.seen == ["reference", "sdpa_math"]


def test_inner_model_choice_beats_outer_model_choice() -> None:
    outer = Outer()
    set_attention_backend(outer, "sdpa_math")
    set_attention_backend(outer.inner, "reference")
    outer(_x())
    assert outer.seen == ["sdpa_math"] and outer.inner.seen == ["reference"]
    reset_attention_backend(outer.inner)
    outer(_x())
    assert outer.inner.seen == ["reference", "sdpa_math"]  # inherits the outer model's choice


def test_forward_that_raises_still_restores_the_selection() -> None:
    class Failing(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise ValueError("bad input")

    model = Failing()
    set_attention_backend(model, "reference")
    with pytest.raises(ValueError, match="bad input"):
        model(_x())
    assert current_attention_backend().name == "sdpa"


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_always_called", "_forward_hooks_with_kwargs")


def _hook_state(model: nn.Module) -> tuple[dict[str, dict[Any, Any]], list[str], dict[str, Tensor]]:
    hooks = {name: dict(getattr(model, name)) for name in _HOOK_DICTS}
    return hooks, sorted(model.__dict__), {name: t.clone() for name, t in model.state_dict().items()}


def test_reset_leaves_the_model_exactly_as_before() -> None:
    model = Probe()
    before = _hook_state(model)
    set_attention_backend(model, "sdpa_math")
    set_attention_backend(model, "reference")  # replacing does not stack hooks
    assert [len(getattr(model, name)) for name in _HOOK_DICTS[:3]] == [1, 1, 1]
    reset_attention_backend(model)
    hooks, attributes, weights = _hook_state(model)
    assert hooks == before[0] and attributes == before[1]
    assert weights.keys() == before[2].keys() and all(torch.equal(weights[n], before[2][n]) for n in weights)
    assert model_attention_backend(model) is None
    reset_attention_backend(model)  # a second reset is a no-op


def test_threads_keep_their_own_selection() -> None:
    seen: dict[str, str] = {}
    barrier = threading.Barrier(2)

    def worker(name: str) -> None:
        with attention_backend(name):
            barrier.wait()
            seen[name] = current_attention_backend().name

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("sdpa_math", "reference")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"sdpa_math": "sdpa_math", "reference": "reference"}


@pytest.mark.parametrize("use", ["context", "model"])
def test_unknown_names_list_the_known_ones(use: str) -> None:
    with pytest.raises(ValueError, match="unknown attention backend 'flash'; known backends: auto, ") as info:
        if use == "context":
            with attention_backend("flash"):
                pass
        else:
            set_attention_backend(Probe(), "flash")
    assert all(name in str(info.value) for name in attention_backend_names())


def test_builtin_names_are_registered() -> None:
    assert {member.value for member in AttentionBackendName} <= set(attention_backend_names())


def test_environment_parsing() -> None:
    assert backend_from_env({}) == "sdpa"
    assert backend_from_env({"DIFFBLOCKS_ATTENTION_BACKEND": " sdpa_math "}) == "sdpa_math"
    with pytest.raises(ValueError, match="DIFFBLOCKS_ATTENTION_BACKEND: unknown attention backend 'fast'"):
        backend_from_env({"DIFFBLOCKS_ATTENTION_BACKEND": "fast"})
    assert checks_from_env({"DIFFBLOCKS_ATTENTION_CHECKS": "1"}) is True
    assert checks_from_env({"DIFFBLOCKS_ATTENTION_CHECKS": "off"}) is False
    with pytest.raises(ValueError, match="DIFFBLOCKS_ATTENTION_CHECKS must be one of"):
        checks_from_env({"DIFFBLOCKS_ATTENTION_CHECKS": "maybe"})


_ENV_SCRIPT = textwrap.dedent(
    """
    import torch
    from torch import nn
    from diffblocks.components.attention import (
        attention_backend, attention_checks_enabled, current_attention_backend, set_attention_backend,
    )

    class Probe(nn.Module):
        def forward(self, x):
            return current_attention_backend().name

    model = Probe()
    assert current_attention_backend().name == "reference", current_attention_backend()
    assert attention_checks_enabled()
    set_attention_backend(model, "sdpa_math")
    assert model(torch.zeros(1)) == "sdpa_math"          # per-model beats the environment
    with attention_backend("sdpa"):
        assert model(torch.zeros(1)) == "sdpa"           # the context manager beats both
    print("ok")
    """
)


def test_environment_variables_set_the_defaults() -> None:
    env = {**os.environ, "DIFFBLOCKS_ATTENTION_BACKEND": "reference", "DIFFBLOCKS_ATTENTION_CHECKS": "1"}
    result = subprocess.run([sys.executable, "-c", _ENV_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
