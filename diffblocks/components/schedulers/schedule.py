"""Sampling schedules: which timesteps to visit and which noise levels (sigmas) they map to.

The numerics (numpy, float64 unless noted) follow diffusers step for step, so a schedule built
here equals the diffusers one exactly, not just closely.
"""

from __future__ import annotations

import math
from typing import Literal, cast

import numpy as np
import torch

from diffblocks.components.schedulers.betas import TimestepSpacing

SigmaSpacing = Literal["karras", "exponential"]


def spaced_timesteps(
    spacing: TimestepSpacing,
    num_steps: int,
    *,
    num_train_timesteps: int,
    steps_offset: int = 0,
    end: int | None = None,
    round_linspace: bool = True,
) -> np.ndarray:
    """``num_steps`` descending float64 timesteps in ``[0, end)`` (Lin et al., 2023, Table 2).

    Args:
        spacing: ``linspace`` spreads evenly including 0 and ``end - 1``; ``leading`` takes
            multiples of ``end // num_steps`` (plus ``steps_offset``); ``trailing`` counts down from
            ``end - 1`` in strides of ``num_train_timesteps / num_steps``.
        num_steps: how many timesteps.
        num_train_timesteps: length of the training schedule.
        steps_offset: added to ``leading`` timesteps (SD's configs use 1).
        end: exclusive upper bound, ``num_train_timesteps`` unless the schedule is clipped.
        round_linspace: round ``linspace`` timesteps to integers (the sigma-based schedulers don't).
    """
    end = num_train_timesteps if end is None else end
    timesteps: np.ndarray
    if spacing == "linspace":
        timesteps = np.linspace(0, end - 1, num_steps)
        timesteps = np.round(timesteps) if round_linspace else timesteps
    elif spacing == "leading":
        timesteps = np.round(np.arange(0, num_steps) * (end // num_steps)) + steps_offset
    else:
        return np.round(np.arange(end, 0, -num_train_timesteps / num_steps)) - 1
    return cast(np.ndarray, timesteps[::-1].copy())


def interpolate_sigmas(timesteps: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Training sigmas linearly interpolated at (possibly fractional) ``timesteps``."""
    return np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Noise levels evenly spaced in ``sigma ** (1 / rho)`` (Karras et al., 2022, Eq. 5)."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Noise levels evenly spaced in ``log(sigma)``."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def respace_sigmas(
    kind: SigmaSpacing,
    sigmas: np.ndarray,
    num_steps: int,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> np.ndarray:
    """Replace descending ``sigmas`` by ``num_steps`` Karras or exponential levels over the same range.

    ``sigma_min``/``sigma_max`` override the range ends taken from ``sigmas[-1]``/``sigmas[0]``.
    """
    low = sigma_min if sigma_min is not None else float(sigmas[-1])
    high = sigma_max if sigma_max is not None else float(sigmas[0])
    if kind == "karras":
        return karras_sigmas(low, high, num_steps)
    return exponential_sigmas(low, high, num_steps)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps whose sigma equals ``sigmas`` (log-linear interpolation).

    Args:
        sigmas: ``(n,)`` noise levels.
        log_sigmas: ``(num_train_timesteps,)`` float32 log training sigmas, ascending.
    """
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[np.newaxis, :] - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * high_idx


def karras_init_noise_sigma(sigmas: torch.Tensor, spacing: TimestepSpacing) -> float:
    """Initial noise scale of a variance-exploding sampler: the largest sigma.

    With ``leading`` spacing diffusers scales by ``sqrt(sigma_max ** 2 + 1)`` instead, which SD
    configs rely on; kept for parity.
    """
    top = sigmas.max()
    return float(top) if spacing in ("linspace", "trailing") else float((top**2 + 1) ** 0.5)


__all__ = [
    "SigmaSpacing",
    "exponential_sigmas",
    "interpolate_sigmas",
    "karras_init_noise_sigma",
    "karras_sigmas",
    "respace_sigmas",
    "sigma_to_t",
    "spaced_timesteps",
]
