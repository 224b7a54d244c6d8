"""Adaptive projected guidance (APG): momentum, norm threshold and the parallel part down-weighted."""

from __future__ import annotations

from collections.abc import Sequence
from typing import final

import torch
from pydantic import model_validator
from torch import Tensor
from typing_extensions import Self

from diffblocks.components.guiders.base import AbstractClassifierFreeGuider, GuiderState, describe_shape
from diffblocks.components.guiders.rules import project

_MSG_NO_STATE = (
    "AdaptiveProjectedGuidance with momentum needs its per-call state: pass state=guider.new_state() "
    "(made once per generation call) to combine."
)


@final
class MomentumState(GuiderState):
    """APG's running average of the guidance update over the steps of one call."""

    __slots__ = ("average",)

    def __init__(self) -> None:
        self.average: Tensor | None = None


@final
class AdaptiveProjectedGuidance(AbstractClassifierFreeGuider):
    """Adaptive projected guidance, Sadat et al. (2024), arXiv:2410.02416 (Algorithm 1).

    The update ``d = cond - uncond`` is (1) accumulated with momentum, ``d <- d + beta * d_prev``
    (the paper recommends a negative beta), (2) shrunk to L2 norm at most ``r``, and (3) split into
    parts parallel and orthogonal to ``cond``; the parallel part, which causes over-saturation, is
    weighted by ``eta``. Then ``uncond + guidance_scale * (d_orth + eta * d_par)``.

    Args:
        adaptive_projected_guidance_momentum: beta; None keeps no momentum (and no state).
        adaptive_projected_guidance_rescale: the norm threshold r; 0 disables it.
        adaptive_projected_guidance_norm_dim: dims of the norm and projection; all but batch when None.
        eta: weight of the parallel part.
        (other fields): as :class:`~diffblocks.components.guiders.base.AbstractClassifierFreeGuider`.
    """

    adaptive_projected_guidance_momentum: float | None = None
    adaptive_projected_guidance_rescale: float = 15.0
    adaptive_projected_guidance_norm_dim: int | tuple[int, ...] | None = None
    eta: float = 1.0

    @model_validator(mode="after")
    def _check_apg(self) -> Self:
        if self.adaptive_projected_guidance_rescale < 0:
            raise ValueError(
                f"adaptive_projected_guidance_rescale must be >= 0, got {self.adaptive_projected_guidance_rescale}."
            )
        if self.adaptive_projected_guidance_norm_dim == ():
            raise ValueError(
                "adaptive_projected_guidance_norm_dim is empty: give the dims to reduce, or None for all but the batch."
            )
        return self

    def check_predictions(self, shape: Sequence[int | None]) -> None:
        """Every dim of ``adaptive_projected_guidance_norm_dim`` must exist in predictions of ``shape``.

        Raises:
            ValueError: a dim out of range, naming the prediction layout and the valid range.
        """
        dims = self.adaptive_projected_guidance_norm_dim
        if dims is None:
            return
        ndim = len(shape)
        bad = [d for d in ((dims,) if isinstance(dims, int) else dims) if not -ndim <= d < ndim]
        if bad:
            shown = describe_shape(shape)
            sizes = "" if shown.endswith("-D") else f" {shown}"
            raise ValueError(
                f"AdaptiveProjectedGuidance adaptive_projected_guidance_norm_dim {dims} names dim {bad[0]}, but this "
                f"model's predictions{sizes} have {ndim} dims: use dims in [-{ndim}, {ndim - 1}], e.g. "
                f"{tuple(range(1, ndim))}, or None for all but the batch."
            )

    def new_state(self) -> MomentumState | None:
        return MomentumState() if self.adaptive_projected_guidance_momentum is not None else None

    def combine(
        self, predictions: Sequence[Tensor], *, state: GuiderState | None, step_index: int, num_steps: int
    ) -> Tensor:
        if not self.guides(step_index, num_steps):
            return predictions[0]
        cond, uncond = predictions
        update = cond - uncond
        if self.adaptive_projected_guidance_momentum is not None:
            if not isinstance(state, MomentumState):
                raise ValueError(_MSG_NO_STATE)
            if state.average is not None:
                update = update + self.adaptive_projected_guidance_momentum * state.average
            state.average = update
        self.check_predictions(tuple(update.shape))
        dims = self._norm_dims(update.ndim)
        threshold = self.adaptive_projected_guidance_rescale
        if threshold > 0:
            norm: Tensor = update.norm(p=2, dim=dims, keepdim=True)
            update = update * torch.minimum(torch.ones_like(update), threshold / norm)
        parallel, orthogonal = project(update, cond, dims=dims)
        start = cond if self.use_original_formulation else uncond
        guided = start + self.guidance_scale * (orthogonal + self.eta * parallel)
        return self._rescaled(guided, cond)

    def _norm_dims(self, ndim: int) -> list[int]:
        dims = self.adaptive_projected_guidance_norm_dim
        if dims is None:
            return list(range(1, ndim))
        return [dims] if isinstance(dims, int) else list(dims)


__all__ = ["AdaptiveProjectedGuidance", "MomentumState"]
