"""DPM-Solver++, UniPC and flow-match Euler against diffusers, config by config.

As in ``test_parity_discrete``: equal timesteps and sigmas, and every scaled input, step output
and re-noised image within float32 rounding, from the same noise and generator seeds.
"""

from __future__ import annotations

from typing import Any

import pytest

from diffblocks.components.schedulers import FlowMatchEulerDiscreteScheduler, flux_sigmas
from tests.schedulers.parity import FLUX_DEV, RTOL, SD, STEPS, case_id, run_side_by_side

DPM = "DPMSolverMultistepScheduler"
UNIPC = "UniPCMultistepScheduler"
FLOW = "FlowMatchEulerDiscreteScheduler"

CASES: list[tuple[str, dict[str, Any]]] = [
    (DPM, dict(SD)),  # DPM++ 2M
    (DPM, {**SD, "use_karras_sigmas": True}),  # DPM++ 2M Karras
    (DPM, {**SD, "use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}),  # DPM++ 2M SDE Karras
    (DPM, {**SD, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "timestep_spacing": "leading"}),
    (DPM, {**SD, "solver_order": 3, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    (DPM, {**SD, "solver_order": 3, "algorithm_type": "sde-dpmsolver++", "use_exponential_sigmas": True}),
    (DPM, {**SD, "use_lu_lambdas": True, "euler_at_final": True, "lower_order_final": False}),
    (DPM, {**SD, "final_sigmas_type": "sigma_min", "prediction_type": "sample", "thresholding": True}),
    (DPM, {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1, "use_karras_sigmas": True}),
    (DPM, {**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    (UNIPC, dict(SD)),
    (UNIPC, {**SD, "solver_order": 3, "use_karras_sigmas": True}),
    # bh1 needs a final sigma above 0: at 0 its B(h) is infinite and diffusers returns NaN
    (UNIPC, {**SD, "solver_type": "bh1", "final_sigmas_type": "sigma_min", "prediction_type": "v_prediction"}),
    (UNIPC, {**SD, "solver_order": 3, "predict_x0": False, "final_sigmas_type": "sigma_min"}),
    (UNIPC, {**SD, "solver_order": 3, "disable_corrector": [0, 2], "use_exponential_sigmas": True}),
    (UNIPC, {**SD, "use_karras_sigmas": True, "sigma_min": 0.1, "final_sigmas_type": "sigma_min"}),
    (UNIPC, {**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}),
    (UNIPC, {**SD, "lower_order_final": False, "final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}),
    (FLOW, {"shift": 3.0}),  # SD3
    (FLOW, {"shift": 1.0}),  # Flux schnell
    (FLOW, {"shift": 2.0, "use_karras_sigmas": True, "stochastic_sampling": True}),
    (FLOW, {"shift": 1.5, "use_exponential_sigmas": True, "invert_sigmas": True}),
]

@pytest.mark.parametrize(("steps", "strength"), STEPS, ids=[f"{n}steps-s{s}" for n, s in STEPS])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_matches_diffusers(case: tuple[str, dict[str, Any]], steps: int, strength: float) -> None:
    name, config = case
    report = run_side_by_side({"_class_name": name, **config}, steps, strength=strength)
    assert report.worst() <= RTOL, report


FLUX_RUNS = [(4, 1.0, 4096), (28, 1.0, 4096), (28, 0.75, 1024), (20, 0.6, 256), (8, 1.0, 9216)]


@pytest.mark.parametrize(("steps", "strength", "seq_len"), FLUX_RUNS)
def test_flux_dynamic_shift_matches_diffusers(steps: int, strength: float, seq_len: int) -> None:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # pyright: ignore[reportUnknownVariableType]

    mu = FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV).mu_for_image_seq_len(seq_len)
    assert mu == calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    report = run_side_by_side(FLUX_DEV, steps, strength=strength, mu=mu, sigmas=flux_sigmas(steps))
    assert report.worst() <= RTOL, report


def test_flux_linear_time_shift_and_terminal_stretch_match_diffusers() -> None:
    config = {**FLUX_DEV, "time_shift_type": "linear", "shift_terminal": 0.1}
    report = run_side_by_side(config, 12, mu=1.1, sigmas=flux_sigmas(12))
    assert report.worst() <= RTOL, report
