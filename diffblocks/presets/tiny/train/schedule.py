"""Training-loop pieces shared by both stages: a time- or step-bounded budget with its learning-rate curve, and EMA."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
from torch import nn


class Budget:
    """Progress through a run that ends after ``steps`` steps or ``seconds`` of wall time, whichever comes first.

    The learning rate warms up linearly over ``warmup`` steps, then follows a cosine to
    ``final_fraction`` of its peak by the end of the budget, measured as the larger of the step
    and time fractions (so a time-bounded run still anneals fully).
    """

    def __init__(self, *, steps: int | None, seconds: float | None, warmup: int, final_fraction: float = 0.1) -> None:
        if steps is None and seconds is None:
            raise ValueError("a training budget needs steps or seconds (or both)")
        if warmup < 0 or (steps is not None and steps < 1) or (seconds is not None and seconds <= 0):
            raise ValueError(f"bad budget: steps {steps}, seconds {seconds}, warmup {warmup}")
        self.steps, self.seconds, self.warmup, self.final_fraction = steps, seconds, warmup, final_fraction
        self.start = time.monotonic()
        self.step = 0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def progress(self) -> float:
        fractions = [0.0]
        if self.steps is not None:
            fractions.append(self.step / self.steps)
        if self.seconds is not None:
            fractions.append(self.elapsed / self.seconds)
        return min(1.0, max(fractions))

    def done(self) -> bool:
        return self.progress >= 1.0

    def lr_factor(self) -> float:
        if self.step < self.warmup:
            return (self.step + 1) / self.warmup
        cosine = 0.5 * (1 + math.cos(math.pi * self.progress))
        return self.final_fraction + (1 - self.final_fraction) * cosine


class EMA:
    """Exponential moving average of a model's parameters (Polyak averaging), with a warm-up of the decay.

    At step ``n`` the decay is ``min(decay, (1 + n) / (10 + n))``, so early averages are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, *, decay: float) -> None:
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in model.parameters()]
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in model.parameters()], 1.0 - decay)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for target, value in zip(model.parameters(), self.shadow, strict=True):
            target.copy_(value)


def param_groups(model: nn.Module, weight_decay: float) -> Iterable[dict[str, object]]:
    """Weight decay on matrices and kernels only, not on biases and norm scales."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
