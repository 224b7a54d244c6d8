"""LoRA adapters as values, carried into a model and out again.

A :class:`LoRA` is a named set of :class:`~diffblocks.components.lora.formats.LoRAWeights`,
one per layer, read once from its file. :func:`inject` wraps each targeted ``nn.Linear`` or
``nn.Conv2d`` of a model in a :class:`~diffblocks.components.lora.layer.LoRALayer` that adds the
update to its output, quantized layers too (:mod:`~diffblocks.components.lora.bases`).
:func:`eject` puts the original modules back, the very objects, so the model is as it was, as
in refiners' ``Adapter.inject`` / ``eject``. Weighing, fusing and listing the attached adapters
is :mod:`~diffblocks.components.lora.attached`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import final

from torch import Tensor, nn

from diffblocks.components.lora.attached import adapter_names, record_source
from diffblocks.components.lora.bases import Base, weight_shape
from diffblocks.components.lora.formats import PREFIXES, LoRAWeights, Naming, convert, read_lora_file
from diffblocks.components.lora.layer import LoRALayer, lora_layers, replace_module, targets
from diffblocks.components.lora.names import layer_names
from diffblocks.components.lora.sources import LoRASource
from diffblocks.components.memory.placement import changing_tensors

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
        >>> import torch
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


def inject(model: nn.Module, lora: LoRA) -> None:
    """Add ``lora`` to ``model``'s layers, wrapping them in :class:`LoRALayer` where not yet wrapped.

    Every shape is checked before anything changes, so a LoRA for another model size leaves the
    model untouched.

    Raises:
        ValueError: the name is already attached, a layer is fused, or an update does not fit its layer.
    """
    check_injectable(model, lora)
    with changing_tensors(model):  # under an offload policy, the new tensors move with their layers from now on
        targets = {name: model.get_submodule(name) for name in lora.layers}
        for name, module in targets.items():
            layer = module if isinstance(module, LoRALayer) else _wrap(model, name, module)
            layer.add(lora.name, lora.layers[name])
    record_source(model, lora.name, lora.source)


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
    layers = {path: layer for path, layer in lora_layers(model) if name in layer.adapters}
    for path, layer in layers.items():
        layer.swap(name, lora.layers[path])
    record_source(model, name, lora.source)


def check_hotswappable(model: nn.Module, name: str, lora: LoRA) -> None:
    """Raise the error :func:`hotswap` would, changing nothing: so several models can be checked first."""
    layers = {path: layer for path, layer in lora_layers(model) if name in layer.adapters}
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
    layers = lora_layers(model)
    if not any(name in layer.adapters for _, layer in layers):
        raise KeyError(f"no LoRA named {name!r} is attached to {type(model).__name__}; attached: {adapter_names(model)}")
    with changing_tensors(model):
        for path, layer in layers:
            if name in layer.adapters:
                layer.unfuse()
                layer.remove(name)
                if not layer.adapters:
                    replace_module(model, path, layer.base)
    record_source(model, name, None)


def _check_fits(lora: LoRA, name: str, base: nn.Module, model: str) -> None:
    if not isinstance(base, Base):
        raise ValueError(f"LoRA {lora.name!r} targets {name!r} of {model}, a {type(base).__name__}, not a Linear or Conv2d layer")
    u = lora.layers[name]
    weight = weight_shape(base)
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


def _wrap(model: nn.Module, path: str, module: nn.Module) -> LoRALayer:
    assert isinstance(module, Base)
    layer = LoRALayer(module)
    replace_module(model, path, layer)
    return layer


__all__ = ["LoRA", "check_hotswappable", "check_injectable", "eject", "hotswap", "inject"]
