"""The layer that carries LoRA updates: a linear or convolution layer, its updates added to its output.

:class:`LoRALayer` holds the original module and adds ``sum_i weight_i * scale_i * up_i(down_i(x))``
to its output (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3; PEFT's
``LoraLayer.forward`` in the same order). :func:`targets` lists the layers a LoRA may wrap, and
:func:`lora_layers` and :func:`replace_module` find and swap the wrapped ones, for
:mod:`~diffblocks.components.lora.adapter` and :mod:`~diffblocks.components.lora.attached`.
"""

from __future__ import annotations

from typing import Any, final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffblocks.components.lora.bases import Base, check_fusable_weight, compute_dtype
from diffblocks.components.lora.formats import LoRAWeights


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
        device, dtype = self.base.weight.device, compute_dtype(self.base)
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
        check_fusable_weight(self.base)

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


def targets(model: nn.Module) -> list[str]:
    """The paths of ``model``'s linear and convolution layers, which a LoRA may target (wrapped or not)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            found.append(name)
        elif isinstance(module, Base) and not isinstance(_parent(model, name), LoRALayer):
            found.append(name)
    return found


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    """The wrapped layers of ``model``, with their paths."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALayer)]


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` of ``model``, in place of what is there."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _parent(model: nn.Module, path: str) -> nn.Module | None:
    parent, dot, _ = path.rpartition(".")
    return model.get_submodule(parent) if dot else None


__all__ = ["LoRALayer", "lora_layers", "replace_module", "targets"]


def _own(tensor: Tensor, given: Tensor) -> Tensor:
    """``tensor``, copied if it shares memory with ``given`` (a view of it, or the very tensor)."""
    same = tensor.untyped_storage().data_ptr() == given.untyped_storage().data_ptr()
    return tensor.clone() if same else tensor
