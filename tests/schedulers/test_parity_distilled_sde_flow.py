"""LCM, TCD, DPM-Solver SDE and flow-match Heun against diffusers, config by config.

As in ``test_parity_discrete``: equal timesteps and sigmas, and every scaled input, step output
and re-noised image within float32 rounding, from the same noise and generator seeds. The SDE's
Brownian noise is fixed by ``noise_sampler_seed``, which diffusers reads from the config too.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.schedulers.parity import RTOL, SD, STEPS, case_id, run_side_by_side

LCM = "LCMScheduler"
TCD = "TCDScheduler"
SDE = "DPMSolverSDEScheduler"
FLOW_HEUN = "FlowMatchHeunDiscreteScheduler"

CASES: list[tuple[str, dict[str, Any]]] = [
    (LCM, dict(SD)),  # an LCM-distilled SD 1.5 / SDXL
    (LCM, {**SD, "prediction_type": "v_prediction", "original_inference_steps": 100, "timestep_scaling": 4.0}),
    (LCM, {"beta_schedule": "linear", "thresholding": True, "prediction_type": "sample"}),
    (LCM, {**SD, "clip_sample": True, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}),
    (LCM, {"beta_schedule": "squaredcos_cap_v2", "original_inference_steps": 30, "set_alpha_to_one": False}),
    (TCD, dict(SD)),  # diffusers' default gamma, 0.3
    (TCD, {**SD, "eta": 0.0}),  # deterministic
    (TCD, {**SD, "eta": 1.0, "prediction_type": "v_prediction"}),
    (TCD, {"eta": 0.7, "prediction_type": "sample", "original_inference_steps": 30, "rescale_betas_zero_snr": True}),
    (SDE, {**SD, "noise_sampler_seed": 3}),
    (SDE, {**SD, "use_karras_sigmas": True, "noise_sampler_seed": 5}),  # DPM++ SDE Karras
    (SDE, {**SD, "timestep_spacing": "leading", "prediction_type": "v_prediction", "noise_sampler_seed": 2**40}),
    (SDE, {**SD, "use_exponential_sigmas": True, "timestep_spacing": "trailing", "noise_sampler_seed": 0}),
    (SDE, {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True, "noise_sampler_seed": 7}),
    (FLOW_HEUN, {"shift": 1.0}),
    (FLOW_HEUN, {"shift": 3.0}),  # SD3's shift
    (FLOW_HEUN, {"shift": 1.7, "num_train_timesteps": 500}),
]


# torchsde (diffusers' Brownian tree) warns when diffusers queries it a rounding error outside its range
@pytest.mark.filterwarnings("ignore:Should have:UserWarning")
@pytest.mark.parametrize(("steps", "strength"), STEPS, ids=[f"{n}steps-s{s}" for n, s in STEPS])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_matches_diffusers(case: tuple[str, dict[str, Any]], steps: int, strength: float) -> None:
    name, config = case
    report = run_side_by_side({"_class_name": name, **config}, steps, strength=strength)
    assert report.worst() <= RTOL, report
