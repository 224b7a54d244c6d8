"""Tangential classifier-free guidance (TCFG): the unconditional prediction filtered by an SVD."""

from __future__ import annotations

from collections.abc import Sequence
from typing import final

import torch
from torch import Tensor

from diffblocks.components.guiders.base import AbstractClassifierFreeGuider, GuiderState
from diffblocks.components.guiders.rules import guide


def tangential_uncond(cond: Tensor, uncond: Tensor) -> Tensor:
    """TCFG eq. 9: keep only the part of ``uncond`` along the top right-singular vector of ``[cond; uncond]``."""
    stacked = torch.stack([cond, uncond], dim=1).float().flatten(2)  # (batch, 2, features)
    vh: Tensor = torch.linalg.svd(stacked, full_matrices=False)[2]
    top = vh[:, :1]  # (batch, 1, features)
    flat = uncond.reshape(uncond.shape[0], 1, -1).float()
    filtered: Tensor = (flat @ top.transpose(-2, -1)) @ top
    return filtered.reshape(uncond.shape).to(cond.dtype)


@final
class TangentialClassifierFreeGuidance(AbstractClassifierFreeGuider):
    """Tangential damping CFG, Kwon et al. (2025), arXiv:2503.18137.

    The unconditional score's component tangential to the data manifold is removed: ``uncond`` is
    projected onto the first right-singular vector of the stacked ``[cond, uncond]`` before the CFG
    update. Fields are those of
    :class:`~diffblocks.components.guiders.base.AbstractClassifierFreeGuider`.
    """

    def combine(
        self, predictions: Sequence[Tensor], *, state: GuiderState | None, step_index: int, num_steps: int
    ) -> Tensor:
        if not self.guides(step_index, num_steps):
            return predictions[0]
        cond, uncond = predictions
        uncond = tangential_uncond(cond, uncond)
        guided = guide(cond, uncond, self.guidance_scale, use_original_formulation=self.use_original_formulation)
        return self._rescaled(guided, cond)


__all__ = ["TangentialClassifierFreeGuidance", "tangential_uncond"]
