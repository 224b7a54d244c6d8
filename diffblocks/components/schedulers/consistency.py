"""Base of the few-step samplers of consistency-distilled models (LCM, TCD).

A distilled model learns to jump along a coarse "skipping" schedule of ``original_inference_steps``
training timesteps, ``k = num_train_timesteps // original_inference_steps`` apart
(``k - 1, 2k - 1, ..., num_train_timesteps - 1``; the skipping-step schedule of Luo et al., 2023). Sampling with
``n`` steps visits ``n`` of them, evenly spaced by index from the noisy end.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, model_validator
from typing_extensions import Self

from diffblocks.components.schedulers.alpha_bar import AbstractAlphaBarScheduler
from diffblocks.components.schedulers.betas import BetaSchedule, TimestepSpacing
from diffblocks.components.schedulers.prediction import PredictionType


class AbstractConsistencyScheduler(AbstractAlphaBarScheduler):
    """A sampler on the skipping schedule of a consistency-distilled model; the config keys LCM and TCD share.

    ``timestep_spacing`` and ``set_alpha_to_one`` are read and written for config fidelity only,
    as in diffusers: the skipping schedule decides the timesteps, and no step reaches past
    timestep 0, where the final alpha-bar would be read.
    """

    beta_start: float = Field(default=0.00085, gt=0.0, lt=1.0)
    beta_end: float = Field(default=0.012, gt=0.0, lt=1.0)
    beta_schedule: BetaSchedule = "scaled_linear"
    original_inference_steps: int = Field(default=50, ge=1)
    clip_sample: bool = False
    clip_sample_range: float = Field(default=1.0, gt=0.0)
    set_alpha_to_one: bool = True
    prediction_type: PredictionType = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = Field(default=0.995, gt=0.0, lt=1.0)
    sample_max_value: float = Field(default=1.0, gt=0.0)
    timestep_spacing: TimestepSpacing = "leading"
    timestep_scaling: float = 10.0
    rescale_betas_zero_snr: bool = False

    @model_validator(mode="after")
    def _check_original_steps(self) -> Self:
        if self.original_inference_steps > self.num_train_timesteps:
            raise ValueError(
                f"original_inference_steps {self.original_inference_steps} exceeds num_train_timesteps "
                f"{self.num_train_timesteps}: the skipping schedule is a subset of the training timesteps."
            )
        return self

    def _zero_terminal_snr(self) -> bool:
        return self.rescale_betas_zero_snr

    def _model_timesteps(self, num_inference_steps: int, *, strength: float) -> np.ndarray:
        """``num_inference_steps`` timesteps of the skipping schedule, evenly spaced by index, descending.

        ``strength`` truncates the run afterwards, as diffusers' SD/SDXL image-to-image pipelines do.
        """
        if num_inference_steps > self.original_inference_steps:
            raise ValueError(
                f"num_inference_steps {num_inference_steps} exceeds original_inference_steps "
                f"{self.original_inference_steps}: the steps are taken from the distillation schedule."
            )
        k = self.num_train_timesteps // self.original_inference_steps
        skipping = (np.arange(1, self.original_inference_steps + 1) * k - 1)[::-1]
        picked = np.floor(np.linspace(0, len(skipping), num=num_inference_steps, endpoint=False)).astype(np.int64)
        return skipping[picked]


__all__ = ["AbstractConsistencyScheduler"]
