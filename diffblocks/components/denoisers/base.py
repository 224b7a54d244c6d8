"""The denoiser seam: every model family is called as ``denoiser(x, t, conditioning) -> prediction``.

As in k-diffusion's ``external.py``, one small wrapper per model family turns that one call into
its model's own arguments, so that guidance, schedulers and the denoising loop never branch on the
model class. The wrapper declares what the model predicts (its :data:`PredictionType`). A step
binds its timestep once with :meth:`AbstractDenoiser.at`; guidance then runs each of its passes as
``predict(x, conditioning)``. ControlNet, IP-Adapter and LoRA attach to the wrapper (each family's
``_predict`` is where the conditioning becomes model arguments), never to the blocks that call it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Literal

from jaxtyping import Float
from torch import Tensor, nn

from diffblocks.components.denoisers.conditioning import Conditioning

PredictionType = Literal["epsilon", "v_prediction", "sample", "flow"]
"""What a model predicts: the noise, v (Salimans & Ho 2022), the clean sample, or the flow ``noise - sample``."""

Predict = Callable[[Tensor, Conditioning], Tensor]
"""``predict(x, conditioning) -> prediction``: a denoiser at one step, with the step's timestep bound."""


class AbstractDenoiser(ABC):
    """A model family's denoiser: ``denoiser(x, t, conditioning) -> prediction`` of :attr:`prediction_type`.

    Concrete denoisers are final; they hold the model and no per-call state, so one is cheap to
    make at every step and safe to share between threads.

    Attributes:
        model: the module that runs (guidance perturbations hook into it).
        prediction_type: what the model's output is.
    """

    __slots__ = ()

    model: nn.Module
    prediction_type: PredictionType

    @abstractmethod
    def __call__(self, x: Float[Tensor, "batch ..."], t: Tensor, conditioning: Conditioning) -> Float[Tensor, "batch ..."]:
        """Predict from the model input ``x`` at timestep ``t`` (the scheduler's, as the loop gives it)."""

    @abstractmethod
    def at(self, t: Tensor) -> Predict:
        """This denoiser at one step: what depends on ``t`` alone is prepared once for all of the step's passes."""


__all__ = ["AbstractDenoiser", "Predict", "PredictionType"]
