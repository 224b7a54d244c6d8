"""Buffers a module computes instead of loading (position tables, frequency grids).

Models are built on the meta device and then filled from a checkpoint. Buffers that no checkpoint
stores would stay on the meta device; modules that own them subclass
:class:`AbstractComputedBuffers`, and the loader recomputes them on the target device.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor, nn


class AbstractComputedBuffers(nn.Module):
    """A module whose non-persistent buffers are a pure function of its hyper-parameters.

    Call :meth:`register_computed_buffers` at the end of ``__init__``; loaders call
    :func:`materialize_computed_buffers` after filling the weights.

    Example:
        >>> class Freqs(AbstractComputedBuffers):
        ...     def __init__(self, dim: int) -> None:
        ...         super().__init__()
        ...         self.dim = dim
        ...         self.register_computed_buffers()
        ...     def compute_buffers(self, device: torch.device) -> dict[str, Tensor]:
        ...         return {"freqs": torch.arange(self.dim, device=device, dtype=torch.float32)}
        >>> with torch.device("meta"):
        ...     m = Freqs(4)
        >>> materialize_computed_buffers(m, device=torch.device("cpu"))
        >>> m.freqs.tolist()
        [0.0, 1.0, 2.0, 3.0]
    """

    @abstractmethod
    def compute_buffers(self, device: torch.device) -> dict[str, Tensor]:
        """Return the buffers by name, computed on ``device``."""

    def register_computed_buffers(self) -> None:
        """Register (or replace) the computed buffers on the current default device."""
        device = torch.empty(0).device  # honours an active `torch.device(...)` context, meta included
        for name, value in self.compute_buffers(device).items():
            self.register_buffer(name, value, persistent=False)


def materialize_computed_buffers(module: nn.Module, *, device: torch.device) -> None:
    """Recompute every :class:`AbstractComputedBuffers` buffer in ``module`` on ``device``."""
    for sub in module.modules():
        if isinstance(sub, AbstractComputedBuffers):
            for name, value in sub.compute_buffers(device).items():
                sub.register_buffer(name, value, persistent=False)


def meta_tensor_names(module: nn.Module) -> list[str]:
    """Names of parameters and buffers still on the meta device (i.e. never filled)."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, tensor in named if tensor.is_meta]


__all__ = ["AbstractComputedBuffers", "materialize_computed_buffers", "meta_tensor_names"]
