"""KDPM2, KDPM2 ancestral and EDM Euler against diffusers, config by config.

As in ``test_parity_discrete``: equal timesteps and sigmas, and every scaled input, step output
and re-noised image within float32 rounding, from the same noise and generator seeds.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.schedulers.parity import RTOL, SD, STEPS, case_id, run_side_by_side

KDPM2 = "KDPM2DiscreteScheduler"
KDPM2_A = "KDPM2AncestralDiscreteScheduler"
EDM = "EDMEulerScheduler"

CASES: list[tuple[str, dict[str, Any]]] = [
    (KDPM2, dict(SD)),
    (KDPM2, {**SD, "timestep_spacing": "leading", "prediction_type": "v_prediction"}),
    (KDPM2, {**SD, "use_karras_sigmas": True}),
    (KDPM2, {"use_exponential_sigmas": True, "timestep_spacing": "trailing", "beta_schedule": "squaredcos_cap_v2"}),
    (KDPM2_A, dict(SD)),
    (KDPM2_A, {**SD, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    (KDPM2_A, {**SD, "use_karras_sigmas": True, "timestep_spacing": "leading"}),
    (KDPM2_A, {"use_exponential_sigmas": True}),
    (EDM, {}),
    (EDM, {"prediction_type": "v_prediction", "sigma_max": 120.0, "sigma_data": 1.0}),  # CosXL
    (EDM, {"sigma_schedule": "exponential", "final_sigmas_type": "sigma_min"}),
    (EDM, {"rho": 3.0, "sigma_min": 0.03, "sigma_max": 14.6}),
]


@pytest.mark.parametrize(("steps", "strength"), STEPS, ids=[f"{n}steps-s{s}" for n, s in STEPS])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_matches_diffusers(case: tuple[str, dict[str, Any]], steps: int, strength: float) -> None:
    name, config = case
    report = run_side_by_side({"_class_name": name, **config}, steps, strength=strength)
    assert report.worst() <= RTOL, report
