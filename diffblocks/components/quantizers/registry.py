"""The allowlist of quantizer classes a config may name, by ``_class_name`` and by diffusers' ``quant_method``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffblocks.registry.allowlist import ConfigAllowlist
from diffblocks.components.quantizers.base import AbstractQuantizer
from diffblocks.components.quantizers.bitsandbytes import BitsAndBytesQuantizer
from diffblocks.components.quantizers.gguf import GGUFQuantizer
from diffblocks.components.quantizers.modelopt import ModelOptQuantizer
from diffblocks.components.quantizers.quanto import QuantoQuantizer
from diffblocks.components.quantizers.torchao import TorchAoQuantizer

_BUILT_IN: tuple[type[AbstractQuantizer], ...] = (
    TorchAoQuantizer, QuantoQuantizer, GGUFQuantizer, BitsAndBytesQuantizer, ModelOptQuantizer,
)

QUANTIZERS: ConfigAllowlist[AbstractQuantizer] = ConfigAllowlist("quantizer", {cls.__name__: cls for cls in _BUILT_IN})
"""Quantizer classes by ``_class_name``; read-only, extended by :func:`register_quantizer`."""


def register_quantizer(cls: type[AbstractQuantizer]) -> type[AbstractQuantizer]:
    """Allow configs to name ``cls`` (usable as a class decorator).

    Raises:
        ValueError: another class is registered under the same name or the same ``quant_method``.
    """
    for known in QUANTIZERS.values():
        if known is not cls and (known.__name__ == cls.__name__ or known.quant_method == cls.quant_method):
            raise ValueError(f"a quantizer {known.__name__} ({known.quant_method}) is already registered ({known.__module__}).")
    return QUANTIZERS.register(cls)


def quantizer_from_config(config: Mapping[str, Any]) -> AbstractQuantizer:
    """Build the quantizer a config names by ``_class_name`` (:meth:`AbstractQuantizer.to_config` output).

    Raises:
        ValueError: the name is missing or not registered (the message lists the known ones), or
            the settings are invalid.
    """
    return QUANTIZERS.from_config(config)


def quantizer_from_diffusers(config: Mapping[str, Any]) -> AbstractQuantizer:
    """The quantizer a diffusers ``quantization_config`` (in a model's ``config.json``) describes.

    bitsandbytes configs carry no ``quant_method`` in some diffusers versions; their
    ``load_in_4bit``/``load_in_8bit`` keys name them.

    Raises:
        ValueError: the backend is not one diffblocks reads (the message lists those it does).
    """
    method = config.get("quant_method")
    if method is None and ("load_in_4bit" in config or "load_in_8bit" in config):
        method = BitsAndBytesQuantizer.quant_method
    for cls in QUANTIZERS.values():
        if cls.quant_method == method:
            return cls.from_diffusers(config)
    known = ", ".join(sorted(cls.quant_method for cls in QUANTIZERS.values()))
    raise ValueError(f"quantization_config names quant_method {method!r}, which diffblocks does not read; it reads: {known}.")


__all__ = ["QUANTIZERS", "quantizer_from_config", "quantizer_from_diffusers", "register_quantizer"]
