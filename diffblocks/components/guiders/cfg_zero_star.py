"""CFG-Zero*: classifier-free guidance with an optimised unconditional scale and zero-initialised steps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import final

import torch
from pydantic import model_validator
from torch import Tensor
from typing_extensions import Self

from diffblocks.components.guiders.base import COND_ONLY, AbstractClassifierFreeGuider, GuidancePass, GuiderState
from diffblocks.components.guiders.rules import guide


def optimized_scale(cond: Tensor, uncond: Tensor, eps: float = 1e-8) -> Tensor:
    """CFG-Zero* eq. 6: ``s* = <cond, uncond> / ||uncond||^2`` per sample, computed in float32."""
    c, u = cond.flatten(1).float(), uncond.flatten(1).float()
    scale = (c * u).sum(dim=1, keepdim=True) / ((u * u).sum(dim=1, keepdim=True) + eps)
    return scale.to(cond.dtype).view(-1, *([1] * (cond.ndim - 1)))


@final
class ClassifierFreeZeroStarGuidance(AbstractClassifierFreeGuider):
    """CFG-Zero*, Fan et al. (2025), arXiv:2503.18886.

    The unconditional prediction is scaled by the projection coefficient ``s*`` before the CFG
    update (sec. 4.1), and the first ``zero_init_steps`` steps predict zero (sec. 4.2: the paper
    suggests the first 4% of steps). A zero-initialised step makes one conditional prediction only
    for its shape, and skips ``guidance_rescale`` (the std of zero is undefined).

    Args:
        zero_init_steps: leading steps whose prediction is zero.
        (other fields): as :class:`~diffblocks.components.guiders.base.AbstractClassifierFreeGuider`.
    """

    zero_init_steps: int = 1

    @model_validator(mode="after")
    def _check_zero_init(self) -> Self:
        if self.zero_init_steps < 0:
            raise ValueError(f"zero_init_steps must be >= 0, got {self.zero_init_steps}.")
        return self

    def passes(self, step_index: int, num_steps: int) -> tuple[GuidancePass, ...]:
        if self.enabled and step_index < self.zero_init_steps:
            return COND_ONLY
        return super().passes(step_index, num_steps)

    def combine(
        self, predictions: Sequence[Tensor], *, state: GuiderState | None, step_index: int, num_steps: int
    ) -> Tensor:
        if self.enabled and step_index < self.zero_init_steps:
            return torch.zeros_like(predictions[0])
        if not self.guides(step_index, num_steps):
            return predictions[0]
        cond, uncond = predictions
        uncond = uncond * optimized_scale(cond, uncond)
        guided = guide(cond, uncond, self.guidance_scale, use_original_formulation=self.use_original_formulation)
        return self._rescaled(guided, cond)


__all__ = ["ClassifierFreeZeroStarGuidance", "optimized_scale"]
