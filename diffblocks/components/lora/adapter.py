"""LoRA adapters as values, and the layer that carries them into a model and out again.

A :class:`LoRA` is a named set of :class:`~diffblocks.components.lora.formats.LoRAWeights`,
one per layer, read once from its file. :func:`inject` wraps each targeted ``nn.Linear`` or
``nn.Conv2d`` of a model in a :class:`LoRALayer` that holds the original module and adds
``sum_i weight_i * scale_i * up_i(down_i(x))`` to its output (Hu et al., 2021, "LoRA: Low-Rank
Adaptation of Large Language Models", eq. 3; PEFT's ``LoraLayer.forward`` in the same order).
:func:`eject` puts the original modules back, the very objects, so the model is as it was, as
in refiners' ``Adapter.inject`` / ``eject``.

A quantized layer (torchao's and quanto's quantized ``nn.Linear`` weights, bitsandbytes'
``Linear4bit``, our :class:`~diffblocks.components.quantizers.GGUFLinear`) is wrapped the same
way: the update runs beside the quantized base in its compute dtype, ``base(x) + scale *
up(down(x))``, and the quantized weights are never touched, so the base stays quantized. Fusing
into them is refused.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffblocks.components.lora.formats import PREFIXES, LoRAWeights, Naming, convert, read_lora_file
from diffblocks.components.lora.names import layer_names
from diffblocks.components.lora.sources import LoRASource
from diffblocks.components.models.saving import register_save_view
from diffblocks.components.quantizers.gguf import GGUFLinear

Base = nn.Linear | nn.Conv2d | GGUFLinear
"""The layers a LoRA may target: linear (float or quantized), convolution, and GGUF-quantized linear."""

_MSG_QUANTIZED = (
    "{cls} weights of {dtype} (quantized) cannot take a fused LoRA: fusing would change the quantized weights. "
    "Keep the LoRA unfused (it runs beside the quantized layer), or load the model without quantization to fuse"
)
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
        source: the file it was read from, pinned and hashed, which a saved preset records; None for
            a LoRA made from tensors (a pipeline holding one cannot be saved).

    Example:
        >>> lora = LoRA("style", {"proj": LoRAWeights(torch.ones(2, 4), torch.zeros(3, 2), alpha=2.0)})
        >>> assert lora.layers["proj"].scale == 1.0
    """

    name: str
    layers: Mapping[str, LoRAWeights] = field(repr=False)
    source: LoRASource | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.name or not self.layers:
            raise ValueError("a LoRA needs a name and at least one layer")

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        model: nn.Module,
        *,
        name: str | None = None,
        allow_pickle: bool = False,
        source: LoRASource | None = None,
    ) -> LoRA:
        """Read a LoRA file (diffusers/PEFT or kohya layout) for ``model``; ``name`` defaults to the file's stem.

        ``source`` records where the file came from (a Hub file at its commit); by default the local file, hashed.
        """
        path = Path(path)
        tensors = read_lora_file(path, allow_pickle=allow_pickle)
        source = source if source is not None else LoRASource.of_file(path)
        return cls.from_state_dict(tensors, model, name=name or path.stem, source=source)

    @classmethod
    def from_state_dict(
        cls,
        tensors: Mapping[str, Tensor],
        model: nn.Module,
        *,
        name: str,
        prefixes: Mapping[str, Naming] = PREFIXES,
        source: LoRASource | None = None,
    ) -> LoRA:
        """Read a LoRA file's tensors for ``model``; ``prefixes`` are the denoiser's unless a text encoder's are given.

        ``source`` records where the tensors came from (a file, hashed, or a Hub file at its commit), so a
        saved preset can name it; None: an adapter made from tensors, which a preset cannot save.
        """
        ours, original = layer_names(model, targets(model))
        return cls(name, convert(tensors, ours, original, model=type(model).__name__, prefixes=prefixes), source)

    @property
    def rank(self) -> int:
        """The largest rank of its layers."""
        return max(u.rank for u in self.layers.values())

    def padded(self, rank: int) -> LoRA:
        """Every layer's update zero-padded to ``rank`` (the same updates), so that a later :func:`hotswap`
        can bring in any LoRA of rank up to ``rank`` without changing a tensor's shape.

        Raises:
            ValueError: a layer's rank is above ``rank`` (the message names it).
        """
        for path, u in self.layers.items():
            if u.rank > rank:
                raise ValueError(f"LoRA {self.name!r} has rank {u.rank} at layer {path!r}, above the target rank {rank}")
        return LoRA(self.name, {path: u.padded(rank) for path, u in self.layers.items()}, self.source)


@final
class LoRALayer(nn.Module):
    """A linear or convolution layer with LoRA updates added to its output, each at its own weight.

    ``fuse`` adds the weighted updates into the base weight, keeping a copy of the original, and
    ``unfuse`` copies it back, so the weight is bit-identical afterwards (subtracting the update
    again, as PEFT does, leaves rounding errors).
    """

    def __init__(self, base: Base) -> None:
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
        fitted = self._fitted(update)
        # The layer owns its tensors: :meth:`swap` writes into them in place, which must not reach the
        # LoRA value they came from (``.to`` and ``flatten`` return it as it is when nothing changes),
        # nor another model or layer holding that value
        down, up = (_own(t, given) for t, given in ((fitted.down, update.down), (fitted.up, update.up)))
        self.updates[name] = LoRAWeights(down, up, fitted.alpha)
        self.weights[name] = 1.0

    @torch.no_grad()
    def swap(self, name: str, update: LoRAWeights) -> None:
        """Copy ``update`` into adapter ``name``'s tensors in place; its scale goes into ``up``, so ``alpha`` stays.

        An update of a lower rank is zero-padded to the attached one's first (the same update).
        """
        current, new = self.updates[name], self._fitted(update.padded(self.updates[name].rank))
        current.down.copy_(new.down)
        current.up.copy_(new.up * (new.scale / current.scale))

    def fits_in_place(self, name: str, update: LoRAWeights) -> bool:
        """Whether ``update`` has the attached one's shapes, up to a rank no higher than the attached one's."""
        current = self.updates[name]
        if update.rank > current.rank:
            return False
        new = self._fitted(update.padded(current.rank))
        return current.down.shape == new.down.shape and current.up.shape == new.up.shape

    def _fitted(self, update: LoRAWeights) -> LoRAWeights:
        """``update`` on the base weight's device and in its compute dtype, its matrices shaped for this layer's kind."""
        device, dtype = self.base.weight.device, _compute_dtype(self.base)
        down = update.down.to(device, dtype)
        up = update.up.to(device, dtype)
        if not isinstance(self.base, nn.Conv2d):
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
            # a quantized base may take and give another dtype than its compute dtype (GGUF, bitsandbytes)
            h = x if x.dtype == u.down.dtype else x.to(u.down.dtype)
            if isinstance(self.base, nn.Conv2d):
                base = self.base
                down = F.conv2d(h, u.down, stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)
                hidden = F.conv2d(down, u.up)
            else:
                hidden = F.linear(F.linear(h, u.down), u.up)
            hidden = hidden * scale
            result = result + (hidden if hidden.dtype == result.dtype else hidden.to(result.dtype))
        return result

    def check_fusable(self) -> None:
        if not self.enabled:
            raise ValueError("the LoRA adapters are disabled; enable them before fusing")
        weight = self.base.weight
        if not weight.dtype.is_floating_point or type(weight.data) is not torch.Tensor or isinstance(self.base, GGUFLinear):
            raise ValueError(_MSG_QUANTIZED.format(cls=type(weight.data).__name__, dtype=weight.dtype))

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
    _record(model, lora.name, lora.source)


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

    The new LoRA must update the same layers, at ranks no higher than the attached ones: a lower
    rank is zero-padded up to the attached one (attach the first LoRA as ``lora.padded(rank)`` to
    leave room). Its tensors are copied into the old ones (the objects a compiled graph reads stay
    the same), and a different ``alpha / rank`` is folded into ``up`` rather than changing the
    scale, a Python float that ``torch.compile`` would guard on. The adapter keeps its name and weight.

    Raises:
        KeyError: no adapter ``name`` is attached.
        ValueError: the layers or ranks differ, or the model is fused; nothing is changed.
    """
    check_hotswappable(model, name, lora)
    layers = {path: layer for path, layer in _layers(model) if name in layer.updates}
    for path, layer in layers.items():
        layer.swap(name, lora.layers[path])
    _record(model, name, lora.source)


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
                f"{tuple(old.down.shape)} and up {tuple(old.up.shape)}, the new one {tuple(new.down.shape)} and {tuple(new.up.shape)}. "
                f"A LoRA of a higher rank needs room prepared before the first is attached: "
                f"inject(model, lora.padded(rank)), or pipe.enable_lora_hotswap(target_rank=rank) before loading"
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
    _record(model, name, None)


def set_weights(model: nn.Module, weights: Mapping[str, float]) -> None:
    """Set each named adapter's weight; the adapters not named get weight 0 (diffusers' ``set_adapters``)."""
    attached = adapter_names(model)
    missing = sorted(set(weights) - set(attached))
    if missing:
        raise KeyError(f"no LoRA named {missing} is attached to {type(model).__name__}; attached: {attached}")
    layers = [layer for _, layer in _layers(model)]
    if any(layer.original is not None for layer in layers):  # every layer checked before any changes
        raise ValueError(f"{type(model).__name__} is fused; unfuse it before changing adapter weights")
    for layer in layers:
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


def adapter_weights(model: nn.Module) -> dict[str, float]:
    """Each attached adapter's weight, in the order they were attached."""
    weights: dict[str, float] = {}
    for _, layer in _layers(model):
        weights.update({name: w for name, w in layer.weights.items() if name not in weights})
    return weights


def is_fused(model: nn.Module) -> bool:
    """Whether the adapters are fused into ``model``'s weights."""
    return any(layer.original is not None for _, layer in _layers(model))


def source_of(model: nn.Module, name: str) -> LoRASource | None:
    """The file the attached adapter ``name`` was read from (its latest, after a hot-swap), or None."""
    return _SOURCES.get(model, {}).get(name)


@contextmanager
def detached(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its original layers and weights in place for the ``with`` block, its adapters back after.

    Saving a model writes its own weights, without adapters and unfused, under its own names; the
    fused weights are computed again afterwards, bit-identical to before.
    """
    layers = _layers(model)
    fused = [layer for _, layer in layers if layer.original is not None]
    for layer in fused:
        layer.unfuse()
    for path, layer in layers:
        _replace(model, path, layer.base)
    try:
        yield model
    finally:
        for path, layer in layers:
            _replace(model, path, layer)
        for layer in fused:
            layer.fuse()


register_save_view(detached)  # a model's own save_pretrained writes it without its adapters, as a pipeline's save does


# Which file each attached adapter came from: kept beside the model (as quantizers are), and forgotten with it.
_SOURCES: weakref.WeakKeyDictionary[nn.Module, dict[str, LoRASource]] = weakref.WeakKeyDictionary()


def _record(model: nn.Module, name: str, source: LoRASource | None) -> None:
    sources = _SOURCES.setdefault(model, {})
    if source is None:
        sources.pop(name, None)
    else:
        sources[name] = source


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
        elif isinstance(module, (nn.Linear, nn.Conv2d, GGUFLinear)) and not isinstance(_parent(model, name), LoRALayer):
            found.append(name)
    return found


def _parent(model: nn.Module, path: str) -> nn.Module | None:
    parent, dot, _ = path.rpartition(".")
    return model.get_submodule(parent) if dot else None


def _layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALayer)]


def _check_fits(lora: LoRA, name: str, base: nn.Module, model: str) -> None:
    if not isinstance(base, (nn.Linear, nn.Conv2d, GGUFLinear)):
        raise ValueError(f"LoRA {lora.name!r} targets {name!r} of {model}, a {type(base).__name__}, not a Linear or Conv2d layer")
    u = lora.layers[name]
    weight = _weight_shape(base)
    update = (u.up.shape[0], *u.down.shape[1:])
    if not isinstance(base, nn.Conv2d):  # kohya writes some linear updates as 1x1 convolutions
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


def _weight_shape(base: Base) -> tuple[int, ...]:
    """The shape of ``base``'s weight as the model computes with it (a packed quantized weight has another)."""
    if isinstance(base, nn.Conv2d):
        return tuple(base.weight.shape)
    return (base.out_features, base.in_features)


def _compute_dtype(base: Base) -> torch.dtype:
    """The floating-point dtype ``base`` computes in: its weight's, else (packed weights) GGUF's compute
    dtype or its bias's, else float32."""
    if isinstance(base, GGUFLinear):
        return base.compute_dtype
    if base.weight.dtype.is_floating_point:
        return base.weight.dtype
    return base.bias.dtype if base.bias is not None else torch.float32


def _own(tensor: Tensor, given: Tensor) -> Tensor:
    """``tensor``, copied if it shares memory with ``given`` (a view of it, or the very tensor)."""
    same = tensor.untyped_storage().data_ptr() == given.untyped_storage().data_ptr()
    return tensor.clone() if same else tensor


def _wrap(model: nn.Module, path: str, module: nn.Module) -> LoRALayer:
    assert isinstance(module, (nn.Linear, nn.Conv2d, GGUFLinear))
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
    "adapter_weights",
    "check_hotswappable",
    "check_injectable",
    "detached",
    "eject",
    "fuse",
    "hotswap",
    "inject",
    "is_fused",
    "set_enabled",
    "set_weights",
    "source_of",
    "targets",
    "unfuse",
]
