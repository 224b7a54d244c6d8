"""ConfigAllowlist: the one allowlist behind GUIDERS and QUANTIZERS (names -> classes, register, from_config)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from typing_extensions import Self

from diffblocks.components.guiders import GUIDERS, ClassifierFreeGuidance
from diffblocks.components.quantizers import QUANTIZERS, TorchAoQuantizer, register_quantizer
from diffblocks.registry import ConfigAllowlist


class Value:
    def __init__(self, size: int) -> None:
        self.size = size

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        return cls(int(config["size"]))


def test_lists_built_ins_by_class_or_by_module_and_builds_from_config() -> None:
    allowlist: ConfigAllowlist[Any] = ConfigAllowlist(
        "value", {"Value": Value, "EulerDiscreteScheduler": "euler"}, package="diffblocks.components.schedulers"
    )
    assert list(allowlist) == ["Value", "EulerDiscreteScheduler"] and len(allowlist) == 2
    assert allowlist["EulerDiscreteScheduler"].__module__ == "diffblocks.components.schedulers.euler"
    assert allowlist.from_config({"_class_name": "Value", "size": 3}).size == 3
    assert not hasattr(allowlist, "__setitem__")  # extended only through register


def test_unknown_or_missing_names_list_the_known_ones() -> None:
    allowlist: ConfigAllowlist[Value] = ConfigAllowlist("value", {"Value": Value})
    with pytest.raises(ValueError, match=r"Unknown value 'Other'; known values: Value\."):
        allowlist.from_config({"_class_name": "Other"})
    with pytest.raises(ValueError, match=r"Unknown value None; known values: Value\."):
        allowlist.from_config({"size": 1})


def test_register_refuses_another_class_under_a_registered_name() -> None:
    allowlist: ConfigAllowlist[Value] = ConfigAllowlist("value", {"Value": Value})
    assert allowlist.register(Value) is Value  # the same class again: allowed
    clash = type("Value", (Value,), {})
    with pytest.raises(ValueError, match=r"A value named 'Value' is already registered \(tests.core.test_allowlist\)"):
        allowlist.register(clash)
    assert allowlist["Value"] is Value


def test_guiders_and_quantizers_share_it() -> None:
    assert isinstance(GUIDERS, ConfigAllowlist) and isinstance(QUANTIZERS, ConfigAllowlist)
    assert GUIDERS["ClassifierFreeGuidance"] is ClassifierFreeGuidance
    assert QUANTIZERS["TorchAoQuantizer"] is TorchAoQuantizer
    same_method = type("OtherTorchAo", (TorchAoQuantizer,), {})
    with pytest.raises(ValueError, match=r"a quantizer TorchAoQuantizer \(torchao\) is already registered"):
        register_quantizer(same_method)
    assert "OtherTorchAo" not in QUANTIZERS
