"""Frequency-decoupled guidance (FDG): CFG with its own scale per Laplacian-pyramid level."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, final

from pydantic import PrivateAttr, model_validator
from torch import Tensor
from typing_extensions import Self

from diffblocks.components.guiders.base import (
    COND_ONLY,
    COND_UNCOND,
    AbstractGuider,
    GuidancePass,
    GuiderState,
    describe_shape,
)
from diffblocks.components.guiders.pyramid import collapse, laplacian_pyramid, max_levels
from diffblocks.components.guiders.rules import is_noop_scale, project, rescale

PerLevel = float | tuple[float, ...]

_MSG_NOT_IMAGE = (
    "FrequencyDecoupledGuidance splits (batch, channels, height, width) predictions into frequency "
    "levels, but this model's are {layout}. Use another guider with this model, e.g. "
    "ClassifierFreeGuidance or AdaptiveProjectedGuidance."
)
_MSG_TOO_MANY_LEVELS = (
    "FrequencyDecoupledGuidance guidance_scales has {levels} levels but a {height}x{width} latent splits into at most {fits} "
    "(each level halves it; the coarsest needs 2x2): give at most {fits} scales, or make larger images."
)


@final
class FrequencyDecoupledGuidance(AbstractGuider):
    """Frequency-decoupled guidance, Sadat et al. (2025), arXiv:2506.19713 (Algorithm 2).

    ``cond`` and ``uncond`` are split into Laplacian-pyramid levels; each level gets its own CFG
    update (scale, window, and optionally a down-weighted part parallel to ``cond``), and the levels
    are collapsed back. The paper suggests a low scale for low frequencies (colour, composition) and
    a high one for high frequencies (detail), e.g. ``(10.0, 5.0)`` for SDXL. Predictions must be
    ``(batch, channels, height, width)``.

    Args:
        guidance_scales: one scale per level, from the finest to the coarsest.
        guidance_rescale: Lin et al. (2023) rescale, one value or one per level.
        parallel_weights: weight of the update part parallel to ``cond`` per level; None is 1 (plain CFG).
        use_original_formulation: start from ``cond`` instead of ``uncond``.
        start: fraction of the steps at which guidance starts, one value or one per level.
        stop: fraction of the steps at which guidance stops, one value or one per level.
        guidance_rescale_space: rescale after collapsing (``"data"``, with the first value) or per level.
        upcast_to_double: project in float64.
        enabled: False makes every step a single conditional prediction.
    """

    guidance_scales: tuple[float, ...] = (10.0, 5.0)
    guidance_rescale: PerLevel = 0.0
    parallel_weights: PerLevel | None = None
    use_original_formulation: bool = False
    start: PerLevel = 0.0
    stop: PerLevel = 1.0
    guidance_rescale_space: Literal["data", "freq"] = "data"
    upcast_to_double: bool = True
    enabled: bool = True
    _levels: tuple[tuple[float, float, float, float, float], ...] = PrivateAttr()

    @model_validator(mode="after")
    def _per_level(self) -> Self:
        count = len(self.guidance_scales)
        if count == 0:
            raise ValueError("guidance_scales needs at least one level, got none.")

        def spread(name: str, value: PerLevel | None, default: float) -> tuple[float, ...]:
            values = (default if value is None else value,) * count if not isinstance(value, tuple) else value
            if len(values) != count:
                raise ValueError(f"{name} has {len(values)} values but guidance_scales has {count} levels.")
            return values  # pyright: ignore[reportReturnType]

        columns = zip(
            self.guidance_scales,
            spread("guidance_rescale", self.guidance_rescale, 0.0),
            spread("parallel_weights", self.parallel_weights, 1.0),
            spread("start", self.start, 0.0),
            spread("stop", self.stop, 1.0),
        )
        self._levels = tuple(columns)
        for level, (_, _, _, start, stop) in enumerate(self._levels):
            if not 0.0 <= start < 1.0 or not start <= stop <= 1.0:
                raise ValueError(
                    f"Level {level} window needs 0 <= start < 1 and start <= stop <= 1, got [{start}, {stop}]."
                )
        return self

    def check_predictions(self, shape: Sequence[int | None]) -> None:
        """Predictions must be 4-D, with a latent large enough for every level.

        Raises:
            ValueError: 3-D (packed Flux tokens) or other non-image predictions, or more levels
                than the latent splits into.
        """
        if len(shape) != 4:
            layout = describe_shape(shape)
            if len(shape) == 3:
                layout = f"{layout}: packed tokens (batch, tokens, channels), as Flux predicts"
            raise ValueError(_MSG_NOT_IMAGE.format(layout=layout))
        height, width = shape[2], shape[3]
        if height is None or width is None:
            return
        fits, levels = max_levels(height, width), len(self._levels)
        if levels > fits:
            raise ValueError(_MSG_TOO_MANY_LEVELS.format(levels=levels, height=height, width=width, fits=fits))

    def _level_guides(self, level: int, step_index: int, num_steps: int) -> bool:
        scale, _, _, start, stop = self._levels[level]
        return int(start * num_steps) <= step_index < int(stop * num_steps) and not is_noop_scale(
            scale, use_original_formulation=self.use_original_formulation
        )

    def passes(self, step_index: int, num_steps: int) -> tuple[GuidancePass, ...]:
        if self.enabled and any(self._level_guides(i, step_index, num_steps) for i in range(len(self._levels))):
            return COND_UNCOND
        return COND_ONLY

    def combine(
        self, predictions: Sequence[Tensor], *, state: GuiderState | None, step_index: int, num_steps: int
    ) -> Tensor:
        if len(predictions) == 1:
            return predictions[0]
        cond, uncond = predictions
        self.check_predictions(tuple(cond.shape))
        levels = len(self._levels)
        cond_bands, uncond_bands = laplacian_pyramid(cond, levels), laplacian_pyramid(uncond, levels)
        guided_bands: list[Tensor] = []
        for level, (c, u) in enumerate(zip(cond_bands, uncond_bands)):
            if not self._level_guides(level, step_index, num_steps):
                guided_bands.append(c)
                continue
            scale, level_rescale, parallel_weight, _, _ = self._levels[level]
            update = c - u
            if not math.isclose(parallel_weight, 1.0):
                parallel, orthogonal = project(update, c, upcast=self.upcast_to_double)
                update = parallel_weight * parallel + orthogonal
            band = (c if self.use_original_formulation else u) + scale * update
            if self.guidance_rescale_space == "freq" and level_rescale > 0.0:
                band = rescale(band, c, level_rescale)
            guided_bands.append(band)
        guided = collapse(guided_bands)[..., : cond.shape[-2], : cond.shape[-1]]
        first_rescale = self._levels[0][1]
        if self.guidance_rescale_space == "data" and first_rescale > 0.0:
            guided = rescale(guided, cond, first_rescale)
        return guided


__all__ = ["FrequencyDecoupledGuidance"]
