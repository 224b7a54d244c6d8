"""Guidance arithmetic shared by the guiders: the CFG update, its rescale, and vector projection."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def is_noop_scale(scale: float, *, use_original_formulation: bool) -> bool:
    """Whether a guidance ``scale`` leaves the conditional prediction unchanged (1, or 0 for the original form)."""
    return math.isclose(scale, 0.0 if use_original_formulation else 1.0)


def guide(cond: Tensor, other: Tensor, scale: float | Tensor, *, use_original_formulation: bool) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): move from ``other`` towards and past ``cond``.

    ``other + scale * (cond - other)`` (the Imagen form), or ``cond + scale * (cond - other)`` with
    ``use_original_formulation``.
    """
    start = cond if use_original_formulation else other
    return start + scale * (cond - other)


def rescale(guided: Tensor, cond: Tensor, factor: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, sec. 3.4): match the guided std to the conditional std.

    Mixes ``guided * std(cond) / std(guided)`` into ``guided`` by ``factor``; stds are per sample.
    """
    dims = list(range(1, cond.ndim))
    matched = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return factor * matched + (1 - factor) * guided


def project(
    vector: Tensor, onto: Tensor, *, dims: Sequence[int] | None = None, upcast: bool = True
) -> tuple[Tensor, Tensor]:
    """Split ``vector`` into its parts parallel and orthogonal to ``onto`` over ``dims`` (per sample).

    Args:
        vector: the tensor to split, ``(batch, ...)``.
        onto: the direction, same shape.
        dims: reduction dims; all but the batch dim when None.
        upcast: compute in float64 (the parts are returned in ``vector``'s dtype).
    """
    reduce = list(dims) if dims is not None else list(range(1, vector.ndim))
    v, u = (vector.double(), onto.double()) if upcast else (vector, onto)
    u = torch.nn.functional.normalize(u, dim=reduce)  # pyright: ignore[reportArgumentType] - takes a dim list
    parallel = (v * u).sum(dim=reduce, keepdim=True) * u
    orthogonal = v - parallel
    return parallel.to(vector.dtype), orthogonal.to(vector.dtype)


__all__ = ["guide", "is_noop_scale", "project", "rescale"]
