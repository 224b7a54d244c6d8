"""Scheduler configs: Hub files, key fidelity, round trips through dicts and folders, and errors."""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import diffusers
import pytest

from diffblocks.components.schedulers import (
    SCHEDULERS,
    AbstractScheduler,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
    scheduler_from_config,
    scheduler_from_pretrained,
)
from tests.schedulers.parity import FLUX_DEV

# scheduler_config.json files as they are on the Hub (FLUX.1-dev's is in parity.py)
SD15 = {  # stable-diffusion-v1-5
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21 = {  # stable-diffusion-2-1 (v-prediction)
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SDXL = {  # stable-diffusion-xl-base-1.0
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
FLUX_SCHNELL = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.29.0.dev0",
    "num_train_timesteps": 1000,
    "shift": 1.0,
}
SD3 = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.29.0.dev0",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}
LCM = {  # the keys of an LCM-distilled SD 1.5 repository's config, as diffusers 0.22 wrote them
    "_class_name": "LCMScheduler",
    "_diffusers_version": "0.22.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
HUB = {
    "sd15": SD15, "sd21": SD21, "sdxl": SDXL, "flux-dev": FLUX_DEV, "flux-schnell": FLUX_SCHNELL, "sd3": SD3, "lcm": LCM
}

NON_DEFAULT: dict[type[AbstractScheduler], dict[str, Any]] = {
    cls: kwargs
    for cls, kwargs in [
        (
            SCHEDULERS["DDPMScheduler"],
            {"variance_type": "learned_range", "trained_betas": (0.1, 0.2, 0.3), "num_train_timesteps": 3},
        ),
        (DDIMScheduler, {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "eta": 0.3}),
        (PNDMScheduler, {"skip_prk_steps": True, "steps_offset": 1}),
        (SCHEDULERS["LMSDiscreteScheduler"], {"use_karras_sigmas": True}),
        (EulerDiscreteScheduler, {"use_karras_sigmas": True, "sigma_min": 0.1, "timestep_spacing": "trailing"}),
        (SCHEDULERS["EulerAncestralDiscreteScheduler"], {"prediction_type": "v_prediction"}),
        (SCHEDULERS["HeunDiscreteScheduler"], {"beta_schedule": "exp", "clip_sample": True}),
        (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
        (UniPCMultistepScheduler, {"disable_corrector": (0, 2), "solver_type": "bh1"}),
        (FlowMatchEulerDiscreteScheduler, {"use_dynamic_shifting": True, "shift_terminal": 0.02}),
        (SCHEDULERS["LCMScheduler"], {"original_inference_steps": 100, "timestep_scaling": 4.0, "steps_offset": 1}),
        (SCHEDULERS["TCDScheduler"], {"prediction_type": "v_prediction", "eta": 0.5}),
        (SCHEDULERS["DPMSolverSDEScheduler"], {"use_karras_sigmas": True, "noise_sampler_seed": 2**40}),
        (SCHEDULERS["FlowMatchHeunDiscreteScheduler"], {"shift": 3.0}),
    ]
}


def _diffusers_keys(name: str) -> set[str]:
    return set(inspect.signature(getattr(diffusers, name).__init__).parameters) - {"self"}


def _same(a: Any, b: Any) -> bool:
    """Equal, with JSON lists equal to tuples."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(cast(Sequence[Any], a)) == list(cast(Sequence[Any], b))
    return bool(a == b)


def _assert_config_matches(ours: AbstractScheduler, ref: Any) -> None:
    """Every config key of the diffusers object has the same value in ours."""
    config = ours.to_config()
    for key in _diffusers_keys(type(ref).__name__):
        assert _same(config[key], ref.config[key]), (key, config[key], ref.config[key])


@pytest.mark.parametrize("config", HUB.values(), ids=HUB.keys())
def test_hub_configs_load_as_in_diffusers(config: dict[str, Any]) -> None:
    ours = scheduler_from_config(config)
    assert type(ours).__name__ == config["_class_name"]
    _assert_config_matches(ours, getattr(diffusers, config["_class_name"]).from_config(config))
    # keys this class does not read (SD1.5's clip_sample for PNDM) are kept for a later swap
    assert set(config) - {"_diffusers_version"} <= set(ours.to_config())


def test_hub_config_values() -> None:
    sd15 = PNDMScheduler.from_config(SD15)
    assert (sd15.skip_prk_steps, sd15.steps_offset, sd15.beta_schedule) == (True, 1, "scaled_linear")
    assert sd15.set_timesteps(50).timesteps[:4].tolist() == [981, 961, 961, 941]
    assert DDIMScheduler.from_config(SD21).prediction_type == "v_prediction"
    assert EulerDiscreteScheduler.from_config(SDXL).timestep_spacing == "leading"
    flux = FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV)
    assert flux.use_dynamic_shifting and flux.mu_for_image_seq_len(4096) == pytest.approx(1.15)


@pytest.mark.parametrize("cls", SCHEDULERS.values(), ids=SCHEDULERS.keys())
def test_config_keys_are_exactly_diffusers_keys(cls: type[AbstractScheduler]) -> None:
    keys = set(cls().to_config()) - {"_class_name", "_use_default_values"}
    assert keys == _diffusers_keys(cls.__name__)


@pytest.mark.parametrize("cls", NON_DEFAULT, ids=[c.__name__ for c in NON_DEFAULT])
def test_to_config_round_trip(cls: type[AbstractScheduler]) -> None:
    scheduler = cls(**NON_DEFAULT[cls])
    config = scheduler.to_config()
    assert config["_class_name"] == cls.__name__
    json.dumps(config)  # JSON-serialisable as is
    assert cls.from_config(config) == scheduler
    assert scheduler_from_config(config) == scheduler
    assert set(NON_DEFAULT[cls]).isdisjoint(config["_use_default_values"])


@pytest.mark.parametrize("cls", NON_DEFAULT, ids=[c.__name__ for c in NON_DEFAULT])
def test_save_and_load_round_trip(cls: type[AbstractScheduler], tmp_path: Path) -> None:
    scheduler = cls(**NON_DEFAULT[cls])
    scheduler.save_pretrained(tmp_path / "scheduler")
    written = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert written["_class_name"] == cls.__name__ and "_use_default_values" not in written
    assert cls.from_pretrained(tmp_path, subfolder="scheduler") == scheduler
    assert scheduler_from_pretrained(tmp_path / "scheduler") == scheduler
    if "eta" not in written:  # diffusers takes DDIM's and TCD's eta per call, not from the config
        ref = getattr(diffusers, cls.__name__).from_pretrained(tmp_path, subfolder="scheduler")
        _assert_config_matches(scheduler, ref)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_reads_configs_diffusers_saves(name: str, tmp_path: Path) -> None:
    ref = getattr(diffusers, name).from_config({**SD15, "_class_name": name})
    ref.save_config(tmp_path)
    _assert_config_matches(scheduler_from_pretrained(tmp_path), ref)


SWAP_TARGETS = [n for n in SCHEDULERS if n != "FlowMatchEulerDiscreteScheduler"]


@pytest.mark.parametrize("target", SWAP_TARGETS)
@pytest.mark.parametrize("source", [SD15, SDXL], ids=["sd15", "sdxl"])
def test_swapping_classes_keeps_what_diffusers_keeps(source: dict[str, Any], target: str) -> None:
    """``Target.from_config(other.to_config())`` = diffusers' ``Target.from_config(other.config)``:
    keys the source left at default take the target's defaults; keys it ignored come along."""
    ours = SCHEDULERS[target].from_config(scheduler_from_config(source).to_config())
    ref_source = getattr(diffusers, source["_class_name"]).from_config(source)
    _assert_config_matches(ours, getattr(diffusers, target).from_config(ref_source.config))


def test_swap_to_ddim_keeps_sd15_clip_sample() -> None:
    assert DDIMScheduler.from_config(PNDMScheduler.from_config(SD15).to_config()).clip_sample is False
    assert DDIMScheduler.from_config(PNDMScheduler().to_config()).clip_sample is True


def test_replace_validates_and_keeps_defaults() -> None:
    euler = EulerDiscreteScheduler.from_config(SDXL).replace(use_karras_sigmas=True)
    assert euler.use_karras_sigmas and euler.timestep_spacing == "leading"
    assert euler.to_config()["clip_sample"] is False  # ignored keys survive
    with pytest.raises(ValueError, match="exclusive"):
        euler.replace(use_exponential_sigmas=True)
    assert "final_sigmas_type" in euler.to_config()["_use_default_values"]


def test_unknown_keys_and_nulls() -> None:
    euler = EulerDiscreteScheduler.from_config({"use_karras_sigmas": None, "some_future_key": 3})
    assert euler.use_karras_sigmas is False
    assert euler.to_config()["some_future_key"] == 3


def test_unknown_class_name_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'KDPM2DiscreteScheduler'.*DDIMScheduler, DDPMScheduler"):
        scheduler_from_config({"_class_name": "KDPM2DiscreteScheduler"})
    with pytest.raises(ValueError, match="None"):
        scheduler_from_config({"num_train_timesteps": 1000})


INVALID = [
    ("DDIMScheduler", {"beta_schedule": "cosine"}, "beta_schedule"),
    ("EulerDiscreteScheduler", {"beta_schedule": "sigmoid"}, "does not support beta_schedule 'sigmoid'"),
    ("DDPMScheduler", {"num_train_timesteps": 0}, "num_train_timesteps"),
    (
        "DDPMScheduler",
        {"trained_betas": [0.1, 0.2], "num_train_timesteps": 10},
        "2 values but num_train_timesteps is 10",
    ),
    ("DPMSolverMultistepScheduler", {"solver_order": 4}, "solver_order"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver"}, "algorithm_type"),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "use_exponential_sigmas": True}, "exclusive"),
    ("EulerDiscreteScheduler", {"interpolation_type": "log_linear"}, "interpolation_type='log_linear'"),
    ("UniPCMultistepScheduler", {"use_flow_sigmas": True}, "use_flow_sigmas=True"),
    ("LMSDiscreteScheduler", {"use_beta_sigmas": True}, "use_beta_sigmas=True"),
    ("PNDMScheduler", {"prediction_type": "sample"}, "prediction_type"),
    ("HeunDiscreteScheduler", {"beta_start": 1.5}, "beta_start"),
    ("FlowMatchEulerDiscreteScheduler", {"shift": -1.0}, "shift"),
    ("LCMScheduler", {"original_inference_steps": 2000}, "original_inference_steps 2000 exceeds num_train_timesteps"),
    ("LCMScheduler", {"beta_schedule": "exp"}, "does not support beta_schedule 'exp'"),
    ("TCDScheduler", {"eta": 1.5}, "eta"),
    ("DPMSolverSDEScheduler", {"prediction_type": "sample"}, "prediction_type"),
    ("DPMSolverSDEScheduler", {"use_beta_sigmas": True}, "use_beta_sigmas=True"),
    ("DPMSolverSDEScheduler", {"use_karras_sigmas": True, "use_exponential_sigmas": True}, "exclusive"),
    ("FlowMatchHeunDiscreteScheduler", {"num_train_timesteps": 0}, "num_train_timesteps"),
]


@pytest.mark.parametrize(("name", "config", "match"), INVALID, ids=[f"{n}-{next(iter(c))}" for n, c, _ in INVALID])
def test_invalid_values_raise(name: str, config: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        scheduler_from_config({"_class_name": name, **config})


def test_frozen_and_hashable() -> None:
    euler = EulerDiscreteScheduler()
    with pytest.raises(ValueError, match="frozen"):
        euler.use_karras_sigmas = True  # type: ignore[misc]
    assert hash(euler) == hash(EulerDiscreteScheduler()) and euler == EulerDiscreteScheduler()
    assert hash(UniPCMultistepScheduler(disable_corrector=(1,))) != hash(UniPCMultistepScheduler())


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_is_an_allowed_component(name: str) -> None:
    """A repository whose model_index.json names any of our schedulers loads it."""
    from diffblocks.registry.defaults import default_component_registry

    assert default_component_registry().resolve(("diffusers", name)) is SCHEDULERS[name]
