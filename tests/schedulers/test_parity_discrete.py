"""DDPM, DDIM, PNDM, LMS, Euler, Euler ancestral and Heun against diffusers, config by config.

Each case samples with a deterministic fake model from the same noise (and, for stochastic
samplers, generators seeded alike) and checks timesteps and sigmas for equality, and every
scaled model input, step output and re-noised image within float32 rounding.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.schedulers.parity import RTOL, SD, STEPS, case_id, run_side_by_side

CASES: list[tuple[str, dict[str, Any]]] = [
    ("DDPMScheduler", {**SD, "clip_sample": False}),
    ("DDPMScheduler", {}),  # linear betas, clipped x0
    ("DDPMScheduler", {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "thresholding": True}),
    ("DDPMScheduler", {"variance_type": "learned_range", "timestep_spacing": "trailing", "clip_sample": False}),
    ("DDPMScheduler", {"variance_type": "fixed_large", "beta_schedule": "sigmoid", "rescale_betas_zero_snr": True}),
    ("DDIMScheduler", {**SD, "clip_sample": False, "set_alpha_to_one": False}),
    ("DDIMScheduler", {**SD, "clip_sample": False, "set_alpha_to_one": False, "prediction_type": "v_prediction"}),
    (
        "DDIMScheduler",
        {
            **SD,
            "timestep_spacing": "trailing",
            "rescale_betas_zero_snr": True,
            "prediction_type": "v_prediction",
            "clip_sample": False,
        },
    ),
    ("DDIMScheduler", {"timestep_spacing": "linspace", "prediction_type": "sample", "eta": 0.5}),
    ("PNDMScheduler", {**SD, "skip_prk_steps": True, "set_alpha_to_one": False}),
    (
        "PNDMScheduler",
        {**SD, "skip_prk_steps": True, "prediction_type": "v_prediction", "timestep_spacing": "linspace"},
    ),
    ("PNDMScheduler", {}),  # the PRK warm-up
    ("LMSDiscreteScheduler", dict(SD)),
    ("LMSDiscreteScheduler", {**SD, "use_karras_sigmas": True, "prediction_type": "v_prediction"}),
    ("LMSDiscreteScheduler", {**SD, "use_exponential_sigmas": True, "timestep_spacing": "leading"}),
    ("EulerDiscreteScheduler", {**SD, "timestep_spacing": "leading"}),  # SDXL
    ("EulerDiscreteScheduler", {**SD, "use_karras_sigmas": True}),
    ("EulerDiscreteScheduler", {**SD, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    ("EulerDiscreteScheduler", {**SD, "use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 10.0}),
    ("EulerDiscreteScheduler", {**SD, "use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"}),
    (
        "EulerDiscreteScheduler",
        {**SD, "prediction_type": "v_prediction", "timestep_type": "continuous", "use_karras_sigmas": True},
    ),
    ("EulerDiscreteScheduler", {**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}),
    ("EulerAncestralDiscreteScheduler", dict(SD)),
    (
        "EulerAncestralDiscreteScheduler",
        {**SD, "timestep_spacing": "trailing", "prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
    ),
    ("HeunDiscreteScheduler", dict(SD)),
    ("HeunDiscreteScheduler", {**SD, "use_karras_sigmas": True, "prediction_type": "v_prediction"}),
    ("HeunDiscreteScheduler", {"timestep_spacing": "leading", "clip_sample": True, "beta_schedule": "exp"}),
]

@pytest.mark.parametrize(("steps", "strength"), STEPS, ids=[f"{n}steps-s{s}" for n, s in STEPS])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_matches_diffusers(case: tuple[str, dict[str, Any]], steps: int, strength: float) -> None:
    name, config = case
    if name == "PNDMScheduler" and not config.get("skip_prk_steps") and (steps < 4 or strength < 1.0):
        pytest.skip("the PRK warm-up needs 4 steps and a full schedule")
    report = run_side_by_side({"_class_name": name, **config}, steps, strength=strength)
    assert report.worst() <= RTOL, report


def test_euler_custom_sigmas_match_diffusers() -> None:
    sigmas = [14.6, 7.0, 3.0, 1.2, 0.4, 0.1, 0.0]
    config = {"_class_name": "EulerDiscreteScheduler", **SD}
    report = run_side_by_side(config, len(sigmas) - 1, sigmas=sigmas)
    assert report.worst() <= RTOL, report
