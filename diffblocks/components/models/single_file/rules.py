"""How one of our weights is made from the tensors of a file in an original key layout.

A layout's table maps each key of the model we build (diffusers' names) to a rule naming the
tensor of the original file it comes from and how: taken as it is, a range of rows of a fused
projection (Flux's ``qkv``, OpenCLIP's ``in_proj_weight``), reshaped (1x1 convolutions that are
linear layers here), with its two halves swapped (shift and scale in Flux's last modulation), or
transposed (OpenCLIP's ``text_projection``). Every rule can be undone, so the same table also
writes a model back in its original layout (:func:`to_original`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Take:
    """The tensor ``key`` as it is."""

    key: str


@dataclass(frozen=True)
class Rows:
    """Rows ``start:stop`` of the fused tensor ``key`` (along the first dimension)."""

    key: str
    start: int
    stop: int


@dataclass(frozen=True)
class Reshaped:
    """The tensor ``key`` with the model's shape (a 1x1 convolution kept as a linear layer, or back)."""

    key: str


@dataclass(frozen=True)
class Swapped:
    """The tensor ``key`` with its two halves swapped along the first dimension."""

    key: str


@dataclass(frozen=True)
class Transposed:
    """The matrix ``key`` transposed."""

    key: str


Rule = Take | Rows | Reshaped | Swapped | Transposed
Table = Callable[[str, Mapping[str, Any]], "Rule | None"]
"""``table(model_key, config)``: where the model's weight comes from; None when the layout has no such weight."""


def converted(rule: Rule, tensors: Mapping[str, Tensor], shape: tuple[int, ...]) -> Tensor:
    """Our weight of ``shape`` made from the original ``tensors`` by ``rule``."""
    tensor = tensors[rule.key]
    if isinstance(rule, Rows):
        return tensor[rule.start : rule.stop]
    if isinstance(rule, Reshaped):
        return tensor.reshape(shape)
    if isinstance(rule, Swapped):
        first, second = tensor.chunk(2, dim=0)
        return torch.cat([second, first], dim=0)
    if isinstance(rule, Transposed):
        return tensor.T.contiguous()
    return tensor


def to_original(
    state: Mapping[str, Tensor], rules: Mapping[str, Rule], *, original_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, Tensor]:
    """Write ``state`` (our keys) in the original layout that ``rules`` (our key -> rule) describe.

    Args:
        state: the model's weights.
        rules: the rule of each weight, from the layout's table.
        original_shapes: shapes of reshaped tensors in the original file; by default a reshaped
            matrix becomes a 1x1 convolution (``[out, in, 1, 1]``), as LDM's VAE attention stores it.
    """
    out: dict[str, Tensor] = {}
    fused: dict[str, list[tuple[int, Tensor]]] = {}
    for key, rule in rules.items():
        tensor = state[key]
        if isinstance(rule, Rows):
            fused.setdefault(rule.key, []).append((rule.start, tensor))
        elif isinstance(rule, Reshaped):
            shape = (original_shapes or {}).get(rule.key, (*tensor.shape, 1, 1) if tensor.ndim == 2 else tensor.shape)
            out[rule.key] = tensor.reshape(shape)
        elif isinstance(rule, Swapped):
            first, second = tensor.chunk(2, dim=0)
            out[rule.key] = torch.cat([second, first], dim=0)
        elif isinstance(rule, Transposed):
            out[rule.key] = tensor.T.contiguous()
        else:
            out[rule.key] = tensor
    for key, parts in fused.items():
        out[key] = torch.cat([tensor for _, tensor in sorted(parts, key=lambda part: part[0])], dim=0)
    return out


__all__ = ["Reshaped", "Rows", "Rule", "Swapped", "Table", "Take", "Transposed", "converted", "to_original"]
