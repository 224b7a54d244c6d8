"""The per-run state: shared schedulers, independent runs, retried steps, schedule shapes and errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from diffblocks.components.schedulers import (
    SCHEDULERS,
    AbstractScheduler,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    SchedulerState,
    TCDScheduler,
    UniPCMultistepScheduler,
    scheduler_from_config,
)
from tests.schedulers.parity import SD, SHAPE, fake_model

MULTISTEP: list[dict[str, Any]] = [
    {"_class_name": "DPMSolverMultistepScheduler", **SD, "solver_order": 3},
    {"_class_name": "DPMSolverMultistepScheduler", **SD, "algorithm_type": "sde-dpmsolver++"},
    {"_class_name": "UniPCMultistepScheduler", **SD, "solver_order": 3},
    {"_class_name": "LMSDiscreteScheduler", **SD},
    {"_class_name": "HeunDiscreteScheduler", **SD},
    {"_class_name": "PNDMScheduler", **SD, "skip_prk_steps": True},
    {"_class_name": "PNDMScheduler"},
    {"_class_name": "DPMSolverSDEScheduler", **SD, "use_karras_sigmas": True, "noise_sampler_seed": 4},
    {"_class_name": "DPMSolverSDEScheduler", **SD},  # the Brownian path seeded from the step generator
    {"_class_name": "FlowMatchHeunDiscreteScheduler", "shift": 3.0},
    {"_class_name": "EulerAncestralDiscreteScheduler", **SD},
    {"_class_name": "LCMScheduler", **SD},
    {"_class_name": "TCDScheduler", **SD},
]
# samplers that draw fresh noise from the generator at every step (a Brownian path does not)
FRESH_NOISE = {"EulerAncestralDiscreteScheduler", "LCMScheduler", "TCDScheduler"}
_ID_KEYS = ("solver_order", "algorithm_type", "skip_prk_steps", "noise_sampler_seed")
IDS = [f"{c['_class_name']}-{next((c[k] for k in _ID_KEYS if k in c), '')}" for c in MULTISTEP]
REPEATABLE = [(c, i) for c, i in zip(MULTISTEP, IDS) if c["_class_name"] not in FRESH_NOISE]


def _start(scheduler: AbstractScheduler, state: SchedulerState, seed: int) -> Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * state.init_noise_sigma


def _step(scheduler: AbstractScheduler, state: SchedulerState, i: int, x: Tensor, gen: torch.Generator) -> Tensor:
    t = state.timesteps[i]
    return scheduler.step(state, fake_model(scheduler.scale_model_input(state, x, i), t), i, x, generator=gen)


def _run(scheduler: AbstractScheduler, steps: int, seed: int) -> Tensor:
    state = scheduler.set_timesteps(steps)
    x, gen = _start(scheduler, state, seed), torch.Generator().manual_seed(seed)
    for i in range(len(state.timesteps)):
        x = _step(scheduler, state, i, x, gen)
    return x


@pytest.mark.parametrize("config", MULTISTEP, ids=IDS)
def test_concurrent_states_do_not_interfere(config: dict[str, Any]) -> None:
    """Two runs interleaved on one shared scheduler equal the same runs done one after the other."""
    scheduler = scheduler_from_config(config)
    alone_a, alone_b = _run(scheduler, 8, seed=1), _run(scheduler, 5, seed=2)
    state_a, state_b = scheduler.set_timesteps(8), scheduler.set_timesteps(5)
    x_a, x_b = _start(scheduler, state_a, 1), _start(scheduler, state_b, 2)
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    for i in range(max(len(state_a.timesteps), len(state_b.timesteps))):
        if i < len(state_a.timesteps):
            x_a = _step(scheduler, state_a, i, x_a, gen_a)
        if i < len(state_b.timesteps):
            x_b = _step(scheduler, state_b, i, x_b, gen_b)
    assert torch.equal(x_a, alone_a) and torch.equal(x_b, alone_b)


@pytest.mark.parametrize("config", [c for c, _ in REPEATABLE], ids=[i for _, i in REPEATABLE])
def test_retried_step_changes_nothing(config: dict[str, Any]) -> None:
    """Running a step again (say, after an interrupted model call) leaves the solver memory intact."""
    scheduler = scheduler_from_config(config)
    if "sde" in str(config.get("algorithm_type")):
        pytest.skip("a retried SDE step draws fresh noise by design")
    state = scheduler.set_timesteps(8)
    x, gen = _start(scheduler, state, 1), torch.Generator().manual_seed(1)
    for i in range(len(state.timesteps)):
        _step(scheduler, state, i, x, gen)  # a first attempt, discarded
        x = _step(scheduler, state, i, x, gen)
    assert torch.equal(x, _run(scheduler, 8, seed=1))


@pytest.mark.parametrize(
    ("scheduler", "needed"),
    [(DPMSolverMultistepScheduler(), 1), (UniPCMultistepScheduler(), 1), (HeunDiscreteScheduler(), 0)],
    ids=["dpm", "unipc", "heun"],
)
def test_step_needing_an_unrun_step_raises(scheduler: AbstractScheduler, needed: int) -> None:
    state = scheduler.set_timesteps(6)
    x = torch.randn(SHAPE)
    index = needed + 1
    with pytest.raises(ValueError, match=f"step {index} needs what step {needed} produced"):
        scheduler.step(state, fake_model(x, state.timesteps[index]), index, x)


def test_step_index_outside_the_schedule_raises() -> None:
    scheduler = EulerDiscreteScheduler()
    state = scheduler.set_timesteps(10, strength=0.5)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="step_index 5 is outside this schedule of 5 steps"):
        scheduler.step(state, x, 5, x)
    with pytest.raises(ValueError, match="step_index -1"):
        scheduler.add_noise(state, x, x, -1)


def test_schedule_shapes() -> None:
    heun = HeunDiscreteScheduler().set_timesteps(10)
    assert heun.sigmas is not None
    assert (len(heun.timesteps), len(heun.sigmas), heun.num_inference_steps) == (19, 20, 10)
    assert len(PNDMScheduler(skip_prk_steps=True).set_timesteps(10).timesteps) == 11
    assert len(PNDMScheduler().set_timesteps(10).timesteps) == 12 + 7
    ddim = DDIMScheduler().set_timesteps(10, strength=0.55)
    assert (ddim.sigmas, ddim.init_noise_sigma, ddim.begin_index, len(ddim.timesteps)) == (None, 1.0, 5, 5)
    euler = EulerDiscreteScheduler(timestep_spacing="leading").set_timesteps(10, device="meta")
    assert euler.timesteps.device.type == "meta" and euler.sigmas is not None and euler.sigmas.device.type == "cpu"
    assert isinstance(euler.init_noise_sigma, float) and euler.init_noise_sigma > 1.0
    flux = FlowMatchEulerDiscreteScheduler().set_timesteps(10, strength=0.75)
    assert flux.begin_index == 2  # int(10 - 7.5): flow pipelines round the skipped steps down


def test_two_call_and_distilled_schedule_shapes() -> None:
    sde = DPMSolverSDEScheduler(use_karras_sigmas=True).set_timesteps(10)
    assert sde.sigmas is not None and sde.timesteps.dtype == torch.float64  # as diffusers keeps them
    assert (len(sde.timesteps), len(sde.sigmas)) == (19, 20)
    flow_heun = FlowMatchHeunDiscreteScheduler(shift=3.0).set_timesteps(10, strength=0.75)
    assert (flow_heun.begin_index, len(flow_heun.timesteps)) == (4, 15)  # int(10 - 7.5) steps of two calls
    lcm = LCMScheduler().set_timesteps(4, strength=0.5)
    assert (lcm.timesteps.tolist(), lcm.begin_index, lcm.init_noise_sigma) == ([499, 259], 2, 1.0)


def test_heun_truncation_skips_whole_steps() -> None:
    state = HeunDiscreteScheduler().set_timesteps(10, strength=0.5)
    assert state.begin_index == 10 and len(state.timesteps) == 9


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: EulerDiscreteScheduler().set_timesteps(0), "num_inference_steps must be >= 1, got 0"),
        (lambda: DDIMScheduler().set_timesteps(1001), "num_inference_steps 1001 exceeds num_train_timesteps 1000"),
        (lambda: DDIMScheduler().set_timesteps(10, strength=0.0), r"strength must be in \(0, 1\], got 0.0"),
        (lambda: DDIMScheduler().set_timesteps(10, strength=1.5), r"strength must be in \(0, 1\], got 1.5"),
        (lambda: DDIMScheduler().set_timesteps(10, strength=0.05), r"keeps int\(10 \* 0.05\) = 0 of 10 steps"),
        (lambda: EulerDiscreteScheduler().set_timesteps(10, mu=0.5), "takes no mu"),
        (lambda: DDIMScheduler().set_timesteps(3, sigmas=[1.0, 0.5, 0.1]), "takes no custom sigmas"),
        (lambda: EulerDiscreteScheduler().set_timesteps(3, sigmas=[3.0, 1.0, 0.0]), "need num_inference_steps"),
        (lambda: FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).set_timesteps(4), "needs mu"),
        (lambda: FlowMatchEulerDiscreteScheduler().set_timesteps(4, sigmas=[1.0, 0.5]), "got 2 sigmas"),
        (lambda: PNDMScheduler().set_timesteps(3), "PRK warm-up needs num_inference_steps >= 4"),
        (lambda: PNDMScheduler().set_timesteps(10, strength=0.5), "skip_prk_steps=True for image-to-image"),
        (lambda: LCMScheduler().set_timesteps(51), "num_inference_steps 51 exceeds original_inference_steps 50"),
        (lambda: TCDScheduler(original_inference_steps=8).set_timesteps(9), "exceeds original_inference_steps 8"),
        (lambda: FlowMatchHeunDiscreteScheduler().set_timesteps(4, mu=1.15), "takes no mu"),
        (lambda: FlowMatchHeunDiscreteScheduler().set_timesteps(2, sigmas=[1.0, 0.5]), "takes no custom sigmas"),
    ],
)
def test_invalid_requests_raise(call: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_mu_is_ignored_without_dynamic_shifting() -> None:
    schnell = FlowMatchEulerDiscreteScheduler()
    assert torch.equal(schnell.set_timesteps(4, mu=1.15).timesteps, schnell.set_timesteps(4).timesteps)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_half_precision_steps_keep_the_dtype(name: str) -> None:
    scheduler = scheduler_from_config({"_class_name": name})
    state = scheduler.set_timesteps(4, mu=0.5 if name == "FlowMatchEulerDiscreteScheduler" else None)
    x = torch.randn(SHAPE).to(torch.bfloat16)
    out = scheduler.step(state, fake_model(x, state.timesteps[0]).to(torch.bfloat16), 0, x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
