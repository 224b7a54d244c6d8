"""Run one of our schedulers and the diffusers class of the same name side by side.

The reference side mirrors what diffusers' pipelines do: ``set_timesteps``, ``get_timesteps`` for
``strength`` (``set_begin_index(t_start * order)``), the initial latents (``init_noise_sigma`` or
``add_noise``/``scale_noise`` at the first kept timestep), then per step ``scale_model_input``,
the model, ``step`` and, like the inpainting pipeline, ``add_noise`` to the next timestep.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import diffusers
import numpy as np
import torch
from torch import Tensor

from diffblocks.components.schedulers import (
    AbstractScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    scheduler_from_config,
)

SHAPE = (2, 4, 8, 8)
RTOL = 1e-5  # float32 rounding, relative to the largest value compared

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
STEPS = [(1, 1.0), (4, 1.0), (10, 1.0), (25, 1.0), (10, 0.6), (25, 0.3)]  # (steps, strength)
FLUX_DEV = {  # FLUX.1-dev's scheduler_config.json as it is on the Hub
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def case_id(case: tuple[str, Mapping[str, Any]]) -> str:
    """A test id: the class name without ``Scheduler`` and the config keys beyond ``SD``."""
    name, config = case
    return name.removesuffix("Scheduler") + "-" + "-".join(f"{k}={v}" for k, v in config.items() if k not in SD)


def fake_model(sample: Tensor, t: Tensor | float, *, out_channels: int | None = None) -> Tensor:
    """A fixed smooth function of the sample and the timestep, standing in for a denoiser."""
    scale = float(t) / 1000.0
    output = 0.5 * torch.tanh(sample) + 0.3 * scale * torch.cos(sample) + 0.1 * (1 - scale) * sample
    if out_channels is not None and out_channels > sample.shape[1]:  # learned variance channels
        output = torch.cat([output, torch.tanh(0.3 * sample)], dim=1)
    return output


def max_error(ours: Tensor, ref: Tensor) -> float:
    """Max abs difference divided by the largest reference magnitude (at least 1)."""
    return (ours.double() - ref.double()).abs().max().item() / max(1.0, ref.abs().max().item())


@dataclass
class Report:
    """Worst relative differences seen in one side-by-side run."""

    final: float = 0.0
    steps: float = 0.0
    noised: float = 0.0
    details: list[str] = field(default_factory=list[str])

    def worst(self) -> float:
        return max(self.final, self.steps, self.noised)


def build_pair(config: Mapping[str, Any]) -> tuple[AbstractScheduler, Any]:
    """Ours through ``scheduler_from_config``, diffusers' through its ``from_config``."""
    ours = scheduler_from_config(config)
    diffusers_config = {k: v for k, v in ours.to_config().items() if k not in ours.extension_keys}
    return ours, getattr(diffusers, config["_class_name"]).from_config(diffusers_config)


def run_side_by_side(
    config: Mapping[str, Any],
    num_inference_steps: int,
    *,
    strength: float = 1.0,
    mu: float | None = None,
    sigmas: Sequence[float] | None = None,
    model: Callable[..., Tensor] = fake_model,
) -> Report:
    """Sample with both schedulers from the same noise and generator seeds; return the differences.

    Timesteps and sigmas must be equal exactly; the samples within float32 rounding.
    """
    ours, ref = build_pair(config)
    flow = isinstance(ours, (FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler))
    ref_kwargs: dict[str, Any] = {}
    if mu is not None:
        ref_kwargs["mu"] = mu
    if sigmas is not None:
        ref_kwargs["sigmas"] = np.asarray(sigmas)
    if flow and sigmas is not None:
        ref.set_timesteps(None, **ref_kwargs)
    elif sigmas is not None:  # Euler: the steps follow from the sigmas
        ref.set_timesteps(**ref_kwargs)
    else:
        ref.set_timesteps(num_inference_steps, **ref_kwargs)
    state = ours.set_timesteps(num_inference_steps, strength=strength, mu=mu, sigmas=sigmas)

    if flow:  # diffusers' flow-matching pipelines round the skipped count down instead
        begin = int(max(num_inference_steps - num_inference_steps * strength, 0))
    else:
        begin = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
    ref_timesteps = ref.timesteps[begin * ref.order :]
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(begin * ref.order)
    assert torch.equal(state.timesteps, ref_timesteps), (state.timesteps, ref_timesteps)
    assert state.timesteps.dtype == ref_timesteps.dtype
    if state.sigmas is not None:
        ref_sigmas = ref.sigmas[begin * ref.order :]
        assert torch.equal(state.sigmas, ref_sigmas.to(state.sigmas.dtype)), (state.sigmas, ref_sigmas)
    if not flow:
        assert math.isclose(state.init_noise_sigma, float(ref.init_noise_sigma), rel_tol=1e-7)

    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(SHAPE, generator=generator)
    noise = torch.randn(SHAPE, generator=generator)
    report = Report()
    if strength < 1.0 or flow:
        first = ref_timesteps[:1]
        ref_sample = ref.scale_noise(clean, first, noise) if flow else ref.add_noise(clean, noise, first)
        sample = ours.add_noise(state, clean, noise, 0)
    else:
        ref_sample = noise * ref.init_noise_sigma
        sample = noise * state.init_noise_sigma
    report.noised = max_error(sample, ref_sample)

    ref_generator = torch.Generator().manual_seed(1)
    our_generator = torch.Generator().manual_seed(1)
    takes_generator = "generator" in inspect.signature(ref.step).parameters
    extra: dict[str, Any] = {"eta": config["eta"]} if "eta" in config else {}  # a call argument in diffusers
    learned = config.get("variance_type") in ("learned", "learned_range")
    out_channels = 2 * SHAPE[1] if learned else None
    for i, t in enumerate(ref_timesteps):
        ref_in = ref.scale_model_input(ref_sample, t) if not flow else ref_sample
        our_in = ours.scale_model_input(state, sample, i)
        report.steps = max(report.steps, max_error(our_in, ref_in))
        step_kwargs = {**extra, "generator": ref_generator} if takes_generator else extra
        ref_sample = ref.step(model(ref_in, t, out_channels=out_channels), t, ref_sample, **step_kwargs).prev_sample
        sample = ours.step(state, model(our_in, t, out_channels=out_channels), i, sample, generator=our_generator)
        report.steps = max(report.steps, max_error(sample, ref_sample))
        if i + 1 < len(ref_timesteps):  # the inpainting pipeline re-noises the image to the next timestep
            nxt = ref_timesteps[i + 1 : i + 2]
            ref_noised = ref.scale_noise(clean, nxt, noise) if flow else ref.add_noise(clean, noise, nxt)
            report.noised = max(report.noised, max_error(ours.add_noise(state, clean, noise, i + 1), ref_noised))
    report.final = max_error(sample, ref_sample)
    return report


__all__ = [
    "FLUX_DEV",
    "RTOL",
    "SD",
    "SHAPE",
    "STEPS",
    "Report",
    "build_pair",
    "case_id",
    "fake_model",
    "max_error",
    "run_side_by_side",
]
