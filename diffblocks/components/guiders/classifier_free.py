"""Classifier-free guidance (Ho & Salimans 2022) with guidance rescale (Lin et al. 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import final

from torch import Tensor

from diffblocks.components.guiders.base import AbstractClassifierFreeGuider, GuiderState
from diffblocks.components.guiders.rules import guide


@final
class ClassifierFreeGuidance(AbstractClassifierFreeGuider):
    """Classifier-free guidance, Ho & Salimans (2022), arXiv:2207.12598.

    ``uncond + guidance_scale * (cond - uncond)``, optionally std-rescaled towards ``cond`` (Lin et
    al. 2023, arXiv:2305.08891), inside the ``[start, stop)`` window of steps. Fields are listed on
    :class:`~diffblocks.components.guiders.base.AbstractClassifierFreeGuider`.

    Example:
        >>> import torch
        >>> cfg = ClassifierFreeGuidance(guidance_scale=5.0)
        >>> [p.condition for p in cfg.passes(0, 30)]
        ['cond', 'uncond']
        >>> cond, uncond = torch.ones(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
        >>> out = cfg.combine([cond, uncond], state=None, step_index=0, num_steps=30)
        >>> assert torch.equal(out, torch.full_like(cond, 5.0))
    """

    def combine(
        self, predictions: Sequence[Tensor], *, state: GuiderState | None, step_index: int, num_steps: int
    ) -> Tensor:
        if not self.guides(step_index, num_steps):
            return predictions[0]
        cond, uncond = predictions
        guided = guide(cond, uncond, self.guidance_scale, use_original_formulation=self.use_original_formulation)
        return self._rescaled(guided, cond)


__all__ = ["ClassifierFreeGuidance"]
