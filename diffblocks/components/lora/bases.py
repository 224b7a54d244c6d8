"""The layers a LoRA may wrap, quantized ones included, and what it reads of them.

A quantized layer (torchao's and quanto's quantized ``nn.Linear`` weights, bitsandbytes'
``Linear4bit``, our :class:`~diffblocks.components.quantizers.GGUFLinear`) is wrapped like a float
one: the update runs beside the quantized base in its compute dtype, ``base(x) + scale *
up(down(x))``, and the quantized weights are never touched, so the base stays quantized. Fusing
into them is refused. A packed weight has another shape and dtype than the layer computes with,
so the shape a LoRA must fit and the dtype its update runs in are read here, not off the weight.
"""

from __future__ import annotations

import torch
from torch import nn

from diffblocks.components.quantizers.gguf import GGUFLinear

Base = nn.Linear | nn.Conv2d | GGUFLinear
"""The layers a LoRA may target: linear (float or quantized), convolution, and GGUF-quantized linear."""

_MSG_QUANTIZED = (
    "{cls} weights of {dtype} (quantized) cannot take a fused LoRA: fusing would change the quantized weights. "
    "Keep the LoRA unfused (it runs beside the quantized layer), or load the model without quantization to fuse"
)


def weight_shape(base: Base) -> tuple[int, ...]:
    """The shape of ``base``'s weight as the model computes with it (a packed quantized weight has another)."""
    if isinstance(base, nn.Conv2d):
        return tuple(base.weight.shape)
    return (base.out_features, base.in_features)


def compute_dtype(base: Base) -> torch.dtype:
    """The floating-point dtype ``base`` computes in: its weight's, else (packed weights) GGUF's compute
    dtype or its bias's, else float32."""
    if isinstance(base, GGUFLinear):
        return base.compute_dtype
    if base.weight.dtype.is_floating_point:
        return base.weight.dtype
    return base.bias.dtype if base.bias is not None else torch.float32


def check_fusable_weight(base: Base) -> None:
    """Raise ValueError unless ``base``'s weight is a plain float tensor, which a fused update may change."""
    weight = base.weight
    if not weight.dtype.is_floating_point or type(weight.data) is not torch.Tensor or isinstance(base, GGUFLinear):
        raise ValueError(_MSG_QUANTIZED.format(cls=type(weight.data).__name__, dtype=weight.dtype))


__all__ = ["Base", "check_fusable_weight", "compute_dtype", "weight_shape"]
