"""Linear multistep sampling of the probability-flow ODE in sigma (Karras et al., 2022; k-diffusion)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import ClassVar, final

import numpy as np
from jaxtyping import Float
from torch import Tensor

from diffblocks.components.noise import Generator
from diffblocks.components.schedulers.karras import AbstractKarrasScheduler, SigmaRespacingMixin
from diffblocks.components.schedulers.prediction import PredictionType, karras_data_prediction
from diffblocks.components.schedulers.state import SchedulerState, StepRecord

_MAX_ORDER = 4


@functools.cache
def _gauss_legendre(points: int) -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = np.polynomial.legendre.leggauss(points)
    return nodes, weights


def lms_coefficient(sigmas: Sequence[float], order: int, j: int, which: int) -> float:
    """Integral over ``[sigmas[j], sigmas[j + 1]]`` of the Lagrange basis polynomial of node ``j - which``.

    The nodes are ``sigmas[j], sigmas[j - 1], ..., sigmas[j - order + 1]``. The integrand is a
    polynomial of degree ``order - 1``, so ``order``-point Gauss-Legendre quadrature is exact.
    """
    nodes, weights = _gauss_legendre(order)
    lo, hi = sigmas[j], sigmas[j + 1]
    taus = (hi + lo) / 2 + (hi - lo) / 2 * nodes
    basis = np.ones_like(taus)
    for k in range(order):
        if k != which:
            basis *= (taus - sigmas[j - k]) / (sigmas[j - which] - sigmas[j - k])
    return float((hi - lo) / 2 * np.dot(weights, basis))


@final
class LMSDiscreteScheduler(SigmaRespacingMixin, AbstractKarrasScheduler):
    """Adams-Bashforth-style linear multistep over up to four past derivatives, with exact coefficients.

    The derivative ``d = (x - x0) / sigma`` is extrapolated by the Lagrange polynomial through the
    last derivatives and integrated over the next sigma interval (k-diffusion's ``sample_lms``, on
    the ODE of Karras et al., 2022). Fields are diffusers' ``LMSDiscreteScheduler`` config keys.

    Example:
        >>> s = LMSDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        >>> round(s.set_timesteps(20).init_noise_sigma, 3)
        14.615
    """

    fixed_config: ClassVar[Mapping[str, object]] = {"use_beta_sigmas": False}

    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    prediction_type: PredictionType = "epsilon"

    def _model_schedule(self, num_steps: int) -> tuple[Tensor, Tensor]:
        """The schedule, re-spaced as ``use_karras_sigmas``/``use_exponential_sigmas`` ask."""
        return self._karras_schedule(num_steps, respace=self._sigma_respacing)

    def step(
        self,
        state: SchedulerState,
        model_output: Float[Tensor, "batch *rest"],
        step_index: int,
        sample: Float[Tensor, "batch *rest"],
        *,
        generator: Generator | None = None,
    ) -> Float[Tensor, "batch *rest"]:
        """``x_next = x + sum_k c_k d_{i-k}``, ``c_k`` the integrated Lagrange basis over ``[sigma_i, sigma_{i+1}]``."""
        j = state.position(step_index)
        x0 = karras_data_prediction(self.prediction_type, model_output, sample, sigma=state.full_sigmas[j])
        derivative = (sample - x0) / state.full_sigmas[j]
        state.remember(step_index, StepRecord(derivative, sample), keep=_MAX_ORDER)
        # diffusers takes the order from the position in the full schedule, so an image-to-image
        # run may weight fewer stored derivatives with higher-order coefficients; kept for parity
        order = min(j + 1, _MAX_ORDER)
        past = range(step_index, max(step_index - order, -1), -1)
        terms = [
            lms_coefficient(state.full_sigmas, order, j, which) * state.recall(k, needed_by=step_index).output
            for which, k in enumerate(past)
        ]
        return sample + sum(terms[1:], terms[0])


__all__ = ["LMSDiscreteScheduler", "lms_coefficient"]
