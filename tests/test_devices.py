"""``diffblocks.default_device()``: CUDA, then NPU, XPU, MPS, then the CPU, each probed safely."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffblocks import default_device
from diffblocks.components.devices import default_device_type

ORDER = ("cuda", "npu", "xpu", "mps")


def _machine(monkeypatch: pytest.MonkeyPatch, *available: str) -> None:
    """Pretend that exactly the ``available`` accelerators are present."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: "cuda" in available)
    monkeypatch.setattr(torch, "npu", SimpleNamespace(is_available=lambda: "npu" in available), raising=False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: "xpu" in available)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: "mps" in available)


@pytest.mark.parametrize("available", [(), *((name,) for name in ORDER), ("npu", "mps"), ("xpu", "mps"), ORDER])
def test_the_first_available_in_the_runtime_order_wins(monkeypatch: pytest.MonkeyPatch, available: tuple[str, ...]) -> None:
    _machine(monkeypatch, *available)
    expected = next((name for name in ORDER if name in available), "cpu")
    assert default_device_type() == expected
    if expected != "npu":  # torch knows "npu" as a device only once the torch_npu plugin renamed its backend
        assert default_device() == torch.device(expected)


def test_a_broken_backend_counts_as_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> bool:
        raise RuntimeError("CUDA driver initialization failed")

    _machine(monkeypatch, "mps")
    monkeypatch.setattr(torch.cuda, "is_available", broken)
    monkeypatch.setattr(torch, "npu", object(), raising=False)  # a torch.npu without is_available
    assert default_device() == torch.device("mps")


def test_the_npu_plugin_is_imported_only_when_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _machine(monkeypatch)
    monkeypatch.setattr(torch, "npu", None)  # no torch.npu until the plugin is imported
    assert default_device_type() == "cpu"  # not installed: nothing imported
    assert "torch_npu" not in sys.modules
    plugin = tmp_path / "torch_npu"
    plugin.mkdir()
    # what the real plugin does on import: add torch.npu
    (plugin / "__init__.py").write_text("import types, torch\ntorch.npu = types.SimpleNamespace(is_available=lambda: True)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert default_device_type() == "npu"
    finally:
        sys.modules.pop("torch_npu", None)
