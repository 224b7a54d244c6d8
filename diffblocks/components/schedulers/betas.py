"""Discrete-time noise schedules: betas, alpha-bar and the Karras sigmas of the training process.

The forward process of DDPM (Ho et al., 2020) noises ``x0`` to ``sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``
over ``num_train_timesteps`` steps; every scheduler of that family derives its sampling
schedule from this table, so it is built here once per config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

import numpy as np
import torch
from jaxtyping import Float
from pydantic import Field, model_validator
from torch import Tensor
from typing_extensions import Self

from diffblocks.components.schedulers.base import MAX_TRAIN_TIMESTEPS, AbstractScheduler
from diffblocks.components.schedulers.state import as_floats

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "exp"]
TimestepSpacing = Literal["linspace", "leading", "trailing"]


def _alpha_bar_cosine(t: float) -> float:
    # improved DDPM cosine schedule (Nichol & Dhariwal, 2021)
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _alpha_bar_laplace(t: float) -> float:
    lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(lmb)
    return math.sqrt(snr / (1 + snr))


def _alpha_bar_exp(t: float) -> float:
    return math.exp(t * -12.0)


def betas_from_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> Tensor:
    """Betas that make the cumulative product follow ``alpha_bar(t)`` on ``t`` in [0, 1]."""
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(
    schedule: BetaSchedule,
    num_steps: int,
    *,
    beta_start: float,
    beta_end: float,
    trained: tuple[float, ...] | None = None,
) -> Tensor:
    """The ``(num_steps,)`` float32 betas of a diffusers ``beta_schedule``."""
    if trained is not None:
        return torch.tensor(trained, dtype=torch.float32)
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float32)
    if schedule == "scaled_linear":
        # the latent-diffusion schedule: linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float32) ** 2
    if schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, num_steps)) * (beta_end - beta_start) + beta_start
    alpha_bar = {"squaredcos_cap_v2": _alpha_bar_cosine, "laplace": _alpha_bar_laplace, "exp": _alpha_bar_exp}
    return betas_from_alpha_bar(num_steps, alpha_bar[schedule])


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale ``sqrt(abar)`` so the last step is pure noise (Lin et al., 2023, Algorithm 1)."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def diffuse(
    original: Float[Tensor, "batch *rest"], noise: Float[Tensor, "batch *rest"], *, alpha: float, sigma: float
) -> Float[Tensor, "batch *rest"]:
    """Sample the forward process ``q(x_t | x0) = N(alpha x0, sigma^2 I)`` with the given ``noise``."""
    return alpha * original + sigma * noise


@dataclass(frozen=True, eq=False)
class TrainingNoise:
    """The training process of one config, in the forms the samplers read.

    Args:
        alphas_cumprod: ``(num_train_timesteps,)`` float32 alpha-bar.
        abar: the same values as Python floats (cheap per-step lookups).
        sigmas: ``(num_train_timesteps,)`` float32 numpy ``sqrt((1 - abar) / abar)``, ascending in t.
        log_sigmas: float32 numpy log of ``sigmas``.
    """

    alphas_cumprod: Tensor
    abar: tuple[float, ...]
    sigmas: np.ndarray
    log_sigmas: np.ndarray


class AbstractBetaScheduler(AbstractScheduler):
    """Base of the schedulers of a model trained with a discrete beta schedule (SD1.5, SDXL, ...).

    Class attributes:
        beta_schedules: the ``beta_schedule`` values this diffusers class accepts.
        terminal_abar: alpha-bar given to the last step when ``rescale_betas_zero_snr`` makes it 0
            (sigma-based schedulers need a finite sigma there), or None to keep 0.
    """

    beta_schedules: ClassVar[frozenset[str]] = frozenset({"linear", "scaled_linear", "squaredcos_cap_v2"})
    terminal_abar: ClassVar[float | None] = None

    num_train_timesteps: int = Field(default=1000, ge=2, le=MAX_TRAIN_TIMESTEPS)
    beta_start: float = Field(default=0.0001, gt=0.0, lt=1.0)
    beta_end: float = Field(default=0.02, gt=0.0, lt=1.0)
    beta_schedule: BetaSchedule = "linear"
    trained_betas: tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _check_betas(self) -> Self:
        if self.beta_schedule not in self.beta_schedules:
            raise ValueError(
                f"{type(self).__name__} does not support beta_schedule {self.beta_schedule!r}; "
                f"choose one of {sorted(self.beta_schedules)}."
            )
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(
                f"trained_betas has {len(self.trained_betas)} values but num_train_timesteps is "
                f"{self.num_train_timesteps}."
            )
        return self

    def _zero_terminal_snr(self) -> bool:
        """Whether betas are rescaled to zero terminal SNR (``rescale_betas_zero_snr``, a key of some classes)."""
        return False

    @cached_property
    def training_noise(self) -> TrainingNoise:
        """The alpha-bar and sigma tables of this config (computed once per instance)."""
        betas = make_betas(
            self.beta_schedule,
            self.num_train_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            trained=self.trained_betas,
        )
        zero_snr = self._zero_terminal_snr()
        if zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if zero_snr and self.terminal_abar is not None:
            alphas_cumprod[-1] = self.terminal_abar
        sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
        with np.errstate(divide="ignore"):
            log_sigmas = np.log(sigmas)
        return TrainingNoise(alphas_cumprod, as_floats(alphas_cumprod), sigmas, log_sigmas)


class AbstractDiscreteScheduler(AbstractBetaScheduler):
    """A discrete-beta scheduler whose ``leading`` timestep spacing is shifted by ``steps_offset``.

    Every such diffusers class but DPM-Solver single-step has the key.
    """

    steps_offset: int = Field(default=0, ge=0)


__all__ = [
    "AbstractBetaScheduler",
    "AbstractDiscreteScheduler",
    "BetaSchedule",
    "TimestepSpacing",
    "TrainingNoise",
    "betas_from_alpha_bar",
    "diffuse",
    "make_betas",
    "rescale_zero_terminal_snr",
]
