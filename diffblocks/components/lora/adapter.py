"""LoRA adapters as values, and the layer that carries them into a model and out again.

A :class:`LoRA` is a named set of :class:`~diffblocks.components.lora.formats.LoRAWeights`,
one per layer, read once from its file. :func:`inject` wraps each targeted ``nn.Linear`` or
``nn.Conv2d`` of a model in a :class:`LoRALayer` that holds the original module and adds
``sum_i weight_i * scale_i * up_i(down_i(x))`` to its output (Hu et al., 2021, "LoRA: Low-Rank
Adaptation of Large Language Models", eq. 3; PEFT's ``LoraLayer.forward`` in the same order).
:func:`eject` puts the original modules back, the very objects, so the model is as it was, as
in refiners' ``Adapter.inject`` / ``eject``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffblocks.components.lora.formats import PREFIXES, LoRAWeights, Naming, convert, read_lora_file
from diffblocks.components.lora.names import layer_names

_MSG_SHAPE = (
    "LoRA {name!r} does not fit {model}: layer {layer!r} has weight {weight}, but the LoRA's update is "
    "{update} (down {down}, up {up}). The LoRA was trained for another model size or family; nothing was changed"
)


@final
@dataclass(frozen=True, slots=True)
class LoRA:
    """A LoRA adapter: its name and one low-rank update per layer path of the model it targets.

    Args:
        name: the adapter name, unique among the adapters of one model.
        layers: module path (``down_blocks.0.attentions.0.proj_in``) to its update.

    Example:
        >>> lora = LoRA("style", {"proj": LoRAWeights(torch.ones(2, 4), torch.zeros(3, 2), alpha=2.0)})
        >>> assert lora.layers["proj"].scale == 1.0
    """

    name: str
    layers: Mapping[str, LoRAWeights] = field(repr=False)

    def __post_init__(self) -> None:
        if not self.name or not self.layers:
            raise ValueError("a LoRA needs a name and at least one layer")

    @classmethod
    def from_file(cls, path: str | Path, model: nn.Module, *, name: str | None = None, allow_pickle: bool = False) -> LoRA:
        """Read a LoRA file (diffusers/PEFT or kohya layout) for ``model``; ``name`` defaults to the file's stem."""
        path = Path(path)
        return cls.from_state_dict(read_lora_file(path, allow_pickle=allow_pickle), model, name=name or path.stem)

    @classmethod
    def from_state_dict(
        cls, tensors: Mapping[str, Tensor], model: nn.Module, *, name: str, prefixes: Mapping[str, Naming] = PREFIXES
    ) -> LoRA:
        """Read a LoRA file's tensors for ``model``; ``prefixes`` are the denoiser's unless a text encoder's are given."""
        ours, original = layer_names(model, targets(model))
        return cls(name, convert(tensors, ours, original, model=type(model).__name__, prefixes=prefixes))


@final
class LoRALayer(nn.Module):
    """A linear or convolution layer with LoRA updates added to its output, each at its own weight.

    ``fuse`` adds the weighted updates into the base weight, keeping a copy of the original, and
    ``unfuse`` copies it back, so the weight is bit-identical afterwards (subtracting the update
    again, as PEFT does, leaves rounding errors).
    """

    def __init__(self, base: nn.Linear | nn.Conv2d) -> None:
        super().__init__()
        self.base = base
        self.updates: dict[str, LoRAWeights] = {}
        self.weights: dict[str, float] = {}
        self.original: Tensor | None = None  # the base weight while fused
        self.enabled = True  # False: the base layer alone, the updates kept

    @property
    def weight(self) -> Tensor:
        """The base layer's weight, for models that read it (T5 checks ``wo.weight.dtype``), as PEFT's layers allow."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def add(self, name: str, update: LoRAWeights) -> None:
        self.updates[name] = self._fitted(update)
        self.weights[name] = 1.0

    @torch.no_grad()
    def swap(self, name: str, update: LoRAWeights) -> None:
        """Copy ``update`` into adapter ``name``'s tensors in place; its scale goes into ``up``, so ``alpha`` stays."""
        current, new = self.updates[name], self._fitted(update)
        current.down.copy_(new.down)
        current.up.copy_(new.up * (new.scale / current.scale))

    def fits_in_place(self, name: str, update: LoRAWeights) -> bool:
        current, new = self.updates[name], self._fitted(update)
        return current.down.shape == new.down.shape and current.up.shape == new.up.shape

    def _fitted(self, update: LoRAWeights) -> LoRAWeights:
        """``update`` on the base weight's device and dtype, its matrices shaped for this layer's kind."""
        weight = self.base.weight
        down = update.down.to(weight.device, weight.dtype)
        up = update.up.to(weight.device, weight.dtype)
        if isinstance(self.base, nn.Linear):
            down, up = down.flatten(1), up.flatten(1)
        elif down.ndim == 2:  # a 1x1 convolution that the file's model had as a linear layer
            down, up = down[:, :, None, None], up[:, :, None, None]
        return LoRAWeights(down, up, update.alpha)

    def _apply(self, fn: Any, recurse: bool = True) -> LoRALayer:
        # The updates are plain tensors (not parameters, so they stay out of the state dict and of
        # training); ``.to()``, ``.half()`` and ``.cuda()`` reach them through here.
        super()._apply(fn, recurse)
        self.updates = {name: LoRAWeights(fn(u.down), fn(u.up), u.alpha) for name, u in self.updates.items()}
        self.original = None if self.original is None else fn(self.original)
        return self

    def delta(self) -> Tensor:
        """The weighted sum of the updates, shaped like the base weight."""
        total = torch.zeros_like(self.base.weight)
        for name, u in self.updates.items():
            product = u.up.flatten(1) @ u.down.flatten(1)
            total += (self.weights[name] * u.scale) * product.reshape(total.shape)
        return total

    def forward(self, x: Tensor) -> Tensor:
        result = self.base(x)
        if self.original is not None or not self.enabled:
            return result  # fused: the updates are in the weight; disabled: left out
        for name, u in self.updates.items():
            scale = self.weights[name] * u.scale
            if scale == 0.0:
                continue
            if isinstance(self.base, nn.Linear):
                hidden = F.linear(F.linear(x, u.down), u.up)
            else:
                base = self.base
                down = F.conv2d(x, u.down, stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)
                hidden = F.conv2d(down, u.up)
            result = result + hidden * scale
        return result

    def check_fusable(self) -> None:
        if not self.enabled:
            raise ValueError("the LoRA adapters are disabled; enable them before fusing")
        weight = self.base.weight
        if not weight.dtype.is_floating_point or type(weight.data) is not torch.Tensor:
            raise ValueError(f"{type(weight.data).__name__} weights of {weight.dtype} (quantized) cannot take a fused LoRA; use it unfused")

    @torch.no_grad()
    def fuse(self) -> None:
        self.check_fusable()
        if self.original is None:
            self.original = self.base.weight.detach().clone()
            self.base.weight += self.delta()

    @torch.no_grad()
    def unfuse(self) -> None:
        if self.original is not None:
            self.base.weight.copy_(self.original)
            self.original = None


def inject(model: nn.Module, lora: LoRA) -> None:
    """Add ``lora`` to ``model``'s layers, wrapping them in :class:`LoRALayer` where not yet wrapped.

    Every shape is checked before anything changes, so a LoRA for another model size leaves the
    model untouched.

    Raises:
        ValueError: the name is already attached, a layer is fused, or an update does not fit its layer.
    """
    check_injectable(model, lora)
    targets = {name: model.get_submodule(name) for name in lora.layers}
    for name, module in targets.items():
        layer = module if isinstance(module, LoRALayer) else _wrap(model, name, module)
        layer.add(lora.name, lora.layers[name])


def check_injectable(model: nn.Module, lora: LoRA) -> None:
    """Raise the error :func:`inject` would, changing nothing: so several models can be checked before any changes."""
    if lora.name in adapter_names(model):
        raise ValueError(
            f"a LoRA named {lora.name!r} is already attached to {type(model).__name__}; eject it first or pick another name"
        )
    for name in lora.layers:
        module = model.get_submodule(name)
        base = module.base if isinstance(module, LoRALayer) else module
        if isinstance(module, LoRALayer) and module.original is not None:
            raise ValueError(f"{type(model).__name__} is fused; unfuse it before attaching LoRA {lora.name!r}")
        _check_fits(lora, name, base, type(model).__name__)


def hotswap(model: nn.Module, name: str, lora: LoRA) -> None:
    """Put ``lora``'s weights into the attached adapter ``name`` in place, so a compiled model does not recompile.

    The new LoRA must update the same layers with the same ranks. Its tensors are copied into the
    old ones (the objects a compiled graph reads stay the same), and a different ``alpha / rank``
    is folded into ``up`` rather than changing the scale, a Python float that ``torch.compile``
    would guard on. The adapter keeps its name and weight.

    Raises:
        KeyError: no adapter ``name`` is attached.
        ValueError: the layers or ranks differ, or the model is fused; nothing is changed.
    """
    check_hotswappable(model, name, lora)
    layers = {path: layer for path, layer in _layers(model) if name in layer.updates}
    for path, layer in layers.items():
        layer.swap(name, lora.layers[path])


def check_hotswappable(model: nn.Module, name: str, lora: LoRA) -> None:
    """Raise the error :func:`hotswap` would, changing nothing: so several models can be checked first."""
    layers = {path: layer for path, layer in _layers(model) if name in layer.updates}
    if not layers:
        raise KeyError(f"no LoRA named {name!r} is attached to {type(model).__name__}; attached: {adapter_names(model)}")
    if set(lora.layers) != set(layers):
        differ = sorted(set(lora.layers) ^ set(layers))
        raise ValueError(f"LoRA {lora.name!r} cannot replace {name!r} in place: they update different layers, e.g. {differ[:3]}")
    for path, layer in layers.items():
        if layer.original is not None:
            raise ValueError(f"{type(model).__name__} is fused; unfuse it before swapping LoRA {name!r}")
        if not layer.fits_in_place(name, lora.layers[path]):
            old, new = layer.updates[name], lora.layers[path]
            raise ValueError(
                f"LoRA {lora.name!r} cannot replace {name!r} in place: at layer {path!r} the attached one has down "
                f"{tuple(old.down.shape)} and up {tuple(old.up.shape)}, the new one {tuple(new.down.shape)} and {tuple(new.up.shape)}"
            )


def eject(model: nn.Module, name: str) -> None:
    """Remove the LoRA ``name``; layers left with no adapter get their original module back."""
    layers = _layers(model)
    if not any(name in layer.updates for _, layer in layers):
        raise KeyError(f"no LoRA named {name!r} is attached to {type(model).__name__}; attached: {adapter_names(model)}")
    for path, layer in layers:
        if name in layer.updates:
            layer.unfuse()
            del layer.updates[name], layer.weights[name]
            if not layer.updates:
                _replace(model, path, layer.base)


def set_weights(model: nn.Module, weights: Mapping[str, float]) -> None:
    """Set each named adapter's weight; the adapters not named get weight 0 (diffusers' ``set_adapters``)."""
    attached = adapter_names(model)
    missing = sorted(set(weights) - set(attached))
    if missing:
        raise KeyError(f"no LoRA named {missing} is attached to {type(model).__name__}; attached: {attached}")
    for _, layer in _layers(model):
        if layer.original is not None:
            raise ValueError(f"{type(model).__name__} is fused; unfuse it before changing adapter weights")
        for name in layer.updates:
            layer.weights[name] = float(weights.get(name, 0.0))


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter of ``model`` off (the base layers alone) or on again, keeping them and their weights.

    Raises:
        ValueError: the model is fused (its weights hold the updates); nothing is changed.
    """
    layers = [layer for _, layer in _layers(model)]
    if any(layer.original is not None for layer in layers):
        raise ValueError(f"{type(model).__name__} is fused; unfuse it before {'enabling' if enabled else 'disabling'} its LoRA adapters")
    for layer in layers:
        layer.enabled = enabled


def fuse(model: nn.Module) -> None:
    """Add every attached adapter, at its weight, into the layers' weights (all or none: quantized weights refuse)."""
    layers = [layer for _, layer in _layers(model)]
    for layer in layers:
        layer.check_fusable()
    for layer in layers:
        layer.fuse()


def unfuse(model: nn.Module) -> None:
    """Restore the weights saved by :func:`fuse`, bit for bit."""
    for _, layer in _layers(model):
        layer.unfuse()


def adapter_names(model: nn.Module) -> list[str]:
    """The attached adapters, in the order they were attached."""
    names: dict[str, None] = {}
    for _, layer in _layers(model):
        names.update(dict.fromkeys(layer.updates))
    return list(names)


def targets(model: nn.Module) -> list[str]:
    """The paths of ``model``'s linear and convolution layers, which a LoRA may target (wrapped or not)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            found.append(name)
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and not isinstance(_parent(model, name), LoRALayer):
            found.append(name)
    return found


def _parent(model: nn.Module, path: str) -> nn.Module | None:
    parent, dot, _ = path.rpartition(".")
    return model.get_submodule(parent) if dot else None


def _layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALayer)]


def _check_fits(lora: LoRA, name: str, base: nn.Module, model: str) -> None:
    if not isinstance(base, (nn.Linear, nn.Conv2d)):
        raise ValueError(f"LoRA {lora.name!r} targets {name!r} of {model}, a {type(base).__name__}, not a Linear or Conv2d layer")
    u = lora.layers[name]
    weight = tuple(base.weight.shape)
    update = (u.up.shape[0], *u.down.shape[1:])
    if isinstance(base, nn.Linear):  # kohya writes some linear updates as 1x1 convolutions
        fits = (update[0], u.down[0].numel()) == weight and u.up[0].numel() == u.rank
    elif u.down.ndim == 2:
        fits = update + (1, 1) == weight and u.up.ndim == 2
    else:
        fits = update == weight and u.up.shape[2:] == (1, 1)
    if not fits:
        raise ValueError(
            _MSG_SHAPE.format(
                name=lora.name, model=model, layer=name, weight=weight, update=update, down=tuple(u.down.shape), up=tuple(u.up.shape)
            )
        )


def _wrap(model: nn.Module, path: str, module: nn.Module) -> LoRALayer:
    assert isinstance(module, (nn.Linear, nn.Conv2d))
    layer = LoRALayer(module)
    _replace(model, path, layer)
    return layer


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


__all__ = [
    "LoRA",
    "LoRALayer",
    "adapter_names",
    "check_hotswappable",
    "check_injectable",
    "eject",
    "fuse",
    "hotswap",
    "inject",
    "set_enabled",
    "set_weights",
    "targets",
    "unfuse",
]
