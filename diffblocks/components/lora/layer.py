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

    Each update's ``down`` and ``up`` are buffers of the layer (not saved with the model's state),
    so whatever moves the layer moves them: ``.to()``, and every offload policy, which streams a
    module's parameters and buffers. ``fuse`` adds the weighted updates into the base weight,
    keeping a copy of the original, and ``unfuse`` copies it back, so the weight is bit-identical
    afterwards (subtracting the update again, as PEFT does, leaves rounding errors).
    """

    def __init__(self, base: Base) -> None:
        super().__init__()
        self.base = base
        self._keys: dict[str, tuple[str, str]] = {}  # adapter name -> the names of its down and up buffers
        self._alphas: dict[str, float] = {}
        self._made = 0
        self.weights: dict[str, float] = {}
        self.original: Tensor | None = None  # the base weight while fused; stays where it was made (it is read only by unfuse)
        self.enabled = True  # False: the base layer alone, the updates kept

    @property
    def weight(self) -> Tensor:
        """The base layer's weight, for models that read it (T5 checks ``wo.weight.dtype``), as PEFT's layers allow."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    @property
    def adapters(self) -> tuple[str, ...]:
        """The adapters attached here, in the order they were attached."""
        return tuple(self._keys)

    @property
    def updates(self) -> dict[str, LoRAWeights]:
        """Each adapter's update as it is now (its tensors are this layer's buffers)."""
        return {name: LoRAWeights(*self._tensors(name), self._alphas[name]) for name in self._keys}

    def _tensors(self, name: str) -> tuple[Tensor, Tensor]:
        down, up = self._keys[name]
        return self._buffers[down], self._buffers[up]  # type: ignore[return-value]

    def add(self, name: str, update: LoRAWeights) -> None:
        fitted = self._fitted(update)
        # The layer owns its tensors: :meth:`swap` writes into them in place, which must not reach the
        # LoRA value they came from (``.to`` and ``flatten`` return it as it is when nothing changes),
        # nor another model or layer holding that value
        down, up = (_own(t, given) for t, given in ((fitted.down, update.down), (fitted.up, update.up)))
        keys, self._made = (f"lora_down_{self._made}", f"lora_up_{self._made}"), self._made + 1
        self.register_buffer(keys[0], down, persistent=False)
        self.register_buffer(keys[1], up, persistent=False)
        self._keys[name], self._alphas[name] = keys, fitted.alpha
        self.weights[name] = 1.0

    def remove(self, name: str) -> None:
        """Drop adapter ``name`` (the layer must be unfused)."""
        down, up = self._keys.pop(name)
        del self._buffers[down], self._buffers[up]
        del self._alphas[name], self.weights[name]

    @torch.no_grad()
    def swap(self, name: str, update: LoRAWeights) -> None:
        """Copy ``update`` into adapter ``name``'s tensors in place; its scale goes into ``up``, so ``alpha`` stays.

        An update of a lower rank is zero-padded to the attached one's first (the same update).
        """
        down, up = self._tensors(name)
        current_scale = self._alphas[name] / down.shape[0]
        new = self._fitted(update.padded(down.shape[0]))
        down.copy_(new.down)
        up.copy_(new.up * (new.scale / current_scale))

    def fits_in_place(self, name: str, update: LoRAWeights) -> bool:
        """Whether ``update`` has the attached one's shapes, up to a rank no higher than the attached one's."""
        down, up = self._tensors(name)
        if update.rank > down.shape[0]:
            return False
        new = self._fitted(update.padded(down.shape[0]))
        return down.shape == new.down.shape and up.shape == new.up.shape

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
        # ``.to()``, ``.half()`` and ``.cuda()`` reach the saved original weight through here (the updates are buffers)
        super()._apply(fn, recurse)
        self.original = None if self.original is None else fn(self.original)
        return self

    def delta(self) -> Tensor:
        """The weighted sum of the updates, shaped like the base weight."""
        total = torch.zeros_like(self.base.weight)
        for name in self._keys:
            down, up = self._tensors(name)
            product = up.flatten(1) @ down.flatten(1)
            total += (self.weights[name] * self._alphas[name] / down.shape[0]) * product.reshape(total.shape)
        return total

    def forward(self, x: Tensor) -> Tensor:
        result = self.base(x)
        if self.original is not None or not self.enabled:
            return result  # fused: the updates are in the weight; disabled: left out
        for name, (down_key, up_key) in self._keys.items():
            down, up = self._buffers[down_key], self._buffers[up_key]
            assert down is not None and up is not None
            scale = self.weights[name] * self._alphas[name] / down.shape[0]
            if scale == 0.0:
                continue
            # a quantized base may take and give another dtype than its compute dtype (GGUF, bitsandbytes)
            h = x if x.dtype == down.dtype else x.to(down.dtype)
            if isinstance(self.base, nn.Conv2d):
                base = self.base
                low = F.conv2d(h, down, stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)
                hidden = F.conv2d(low, up)
            else:
                hidden = F.linear(F.linear(h, down), up)
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
