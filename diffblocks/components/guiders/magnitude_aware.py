"""Magnitude-aware guidance (MAMBO-G): the CFG scale damped where the update is large."""

from __future__ import annotations

from collections.abc import Sequence
from typing import final

import torch
from pydantic import model_validator
from torch import Tensor
from typing_extensions import Self

from diffblocks.components.guiders.base import AbstractClassifierFreeGuider, GuiderState


@final
class MagnitudeAwareGuidance(AbstractClassifierFreeGuider):
    """Magnitude-aware mitigation for boosted guidance (MAMBO-G), arXiv:2508.03442.

    With ``r = ||cond - uncond|| / ||uncond||`` per sample, the scale becomes
    ``1 + (guidance_scale - 1) * exp(-alpha * r)`` (``guidance_scale * exp(-alpha * r)`` in the
    original form), so steps with a large relative update (early, high-noise) are guided less.

    Args:
        guidance_scale: the undamped CFG scale (default 10).
        alpha: damping strength, >= 0; larger suppresses large updates more (0 is plain CFG; a
            negative alpha would amplify the large updates the method exists to damp).
        (other fields): as :class:`~diffblocks.components.guiders.base.AbstractClassifierFreeGuider`.
    """

    guidance_scale: float = 10.0
    alpha: float = 8.0

    @model_validator(mode="after")
    def _check_alpha(self) -> Self:
        if self.alpha < 0.0:
            raise ValueError(
                f"alpha must be >= 0 (0 is plain CFG), got {self.alpha}: a negative alpha amplifies large updates."
            )
        return self

    def combine(
        self, predictions: Sequence[Tensor], *, state: GuiderState | None, step_index: int, num_steps: int
    ) -> Tensor:
        if not self.guides(step_index, num_steps):
            return predictions[0]
        cond, uncond = predictions
        dims = list(range(1, cond.ndim))
        update = cond - uncond
        norm = torch.linalg.vector_norm
        ratio = norm(update, dim=dims, keepdim=True) / norm(uncond, dim=dims, keepdim=True)
        damping = torch.exp(-self.alpha * ratio)
        if self.use_original_formulation:
            guided = cond + self.guidance_scale * damping * update
        else:
            guided = uncond + (1.0 + (self.guidance_scale - 1.0) * damping) * update
        return self._rescaled(guided, cond)


__all__ = ["MagnitudeAwareGuidance"]
