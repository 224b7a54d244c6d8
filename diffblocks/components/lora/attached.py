"""What is done with the adapters attached to a model: weigh, enable, fuse, list, and set aside for saving.

Every function reads the :class:`~diffblocks.components.lora.layer.LoRALayer` modules of the model,
so it acts on every adapter :func:`~diffblocks.components.lora.adapter.inject` attached, wherever
the model is shared. Which file each adapter was read from is kept beside the model.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from torch import nn

from diffblocks.components.lora.layer import lora_layers, replace_module
from diffblocks.components.lora.sources import LoRASource
from diffblocks.components.models.saving import register_save_view


def adapter_names(model: nn.Module) -> list[str]:
    """The attached adapters, in the order they were attached."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def set_weights(model: nn.Module, weights: Mapping[str, float]) -> None:
    """Set each named adapter's weight; the adapters not named get weight 0 (diffusers' ``set_adapters``)."""
    attached = adapter_names(model)
    missing = sorted(set(weights) - set(attached))
    if missing:
        raise KeyError(f"no LoRA named {missing} is attached to {type(model).__name__}; attached: {attached}")
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.original is not None for layer in layers):  # every layer checked before any changes
        raise ValueError(f"{type(model).__name__} is fused; unfuse it before changing adapter weights")
    for layer in layers:
        for name in layer.adapters:
            layer.weights[name] = float(weights.get(name, 0.0))


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter of ``model`` off (the base layers alone) or on again, keeping them and their weights.

    Raises:
        ValueError: the model is fused (its weights hold the updates); nothing is changed.
    """
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.original is not None for layer in layers):
        raise ValueError(f"{type(model).__name__} is fused; unfuse it before {'enabling' if enabled else 'disabling'} its LoRA adapters")
    for layer in layers:
        layer.enabled = enabled


def fuse(model: nn.Module) -> None:
    """Add every attached adapter, at its weight, into the layers' weights (all or none: quantized weights refuse)."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.check_fusable()
    for layer in layers:
        layer.fuse()


def unfuse(model: nn.Module) -> None:
    """Restore the weights saved by :func:`fuse`, bit for bit."""
    for _, layer in lora_layers(model):
        layer.unfuse()


def adapter_weights(model: nn.Module) -> dict[str, float]:
    """Each attached adapter's weight, in the order they were attached."""
    weights: dict[str, float] = {}
    for _, layer in lora_layers(model):
        weights.update({name: w for name, w in layer.weights.items() if name not in weights})
    return weights


def is_fused(model: nn.Module) -> bool:
    """Whether the adapters are fused into ``model``'s weights."""
    return any(layer.original is not None for _, layer in lora_layers(model))


@contextmanager
def detached(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its original layers and weights in place for the ``with`` block, its adapters back after.

    Saving a model writes its own weights, without adapters and unfused, under its own names; the
    fused weights are computed again afterwards, bit-identical to before.
    """
    layers = lora_layers(model)
    fused = [layer for _, layer in layers if layer.original is not None]
    for layer in fused:
        layer.unfuse()
    for path, layer in layers:
        replace_module(model, path, layer.base)
    try:
        yield model
    finally:
        for path, layer in layers:
            replace_module(model, path, layer)
        for layer in fused:
            layer.fuse()


register_save_view(detached)  # a model's own save_pretrained writes it without its adapters, as a pipeline's save does


# Which file each attached adapter came from: kept beside the model (as quantizers are), and forgotten with it.
_SOURCES: weakref.WeakKeyDictionary[nn.Module, dict[str, LoRASource]] = weakref.WeakKeyDictionary()


def record_source(model: nn.Module, name: str, source: LoRASource | None) -> None:
    """Record that adapter ``name`` of ``model`` was read from ``source``; None forgets it (an ejected adapter)."""
    sources = _SOURCES.setdefault(model, {})
    if source is None:
        sources.pop(name, None)
    else:
        sources[name] = source


def source_of(model: nn.Module, name: str) -> LoRASource | None:
    """The file the attached adapter ``name`` was read from (its latest, after a hot-swap), or None."""
    return _SOURCES.get(model, {}).get(name)


__all__ = [
    "adapter_names",
    "adapter_weights",
    "detached",
    "fuse",
    "is_fused",
    "record_source",
    "set_enabled",
    "set_weights",
    "source_of",
    "unfuse",
]
