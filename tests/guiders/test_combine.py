"""Each guider's passes and combine rule against the matching diffusers 0.42.1 guider, step by step."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import guiders as dg
from torch import Tensor

from diffblocks.components.guiders import (
    AbstractGuider,
    AdaptiveProjectedGuidance,
    AutoGuidance,
    ClassifierFreeGuidance,
    ClassifierFreeZeroStarGuidance,
    FrequencyDecoupledGuidance,
    MagnitudeAwareGuidance,
    MomentumState,
    PerturbedAttentionGuidance,
    SkipLayerGuidance,
    SmoothedEnergyGuidance,
    TangentialClassifierFreeGuidance,
)
from diffblocks.components.guiders.pyramid import collapse, laplacian_pyramid

SHAPE = (2, 4, 16, 16)
STEPS = 10
TOLERANCE = 1e-6


def _name(guidance_pass: Any, perturbed_name: str) -> str:
    if guidance_pass.perturbation is None:
        return f"pred_{guidance_pass.condition}"
    return perturbed_name if guidance_pass.condition == "cond" else "pred_uncond"


def compare(
    ours: AbstractGuider,
    theirs: Any,
    *,
    perturbed_name: str = "pred_cond_skip",
    steps: int = STEPS,
    shape: tuple[int, ...] = SHAPE,
) -> float:
    """Run both guiders over ``steps`` steps on the same random predictions; return the max abs diff."""
    state = ours.new_state()
    worst = 0.0
    for step in range(steps):
        theirs.set_state(step, steps, None)
        if hasattr(theirs, "momentum_buffer"):
            theirs.prepare_inputs({})  # diffusers resets APG momentum here at step 0
        passes = ours.passes(step, steps)
        assert len(passes) == theirs.num_conditions, f"step {step}: {passes} vs {theirs.num_conditions}"
        predictions = [torch.randn(shape) for _ in passes]
        named = {_name(p, perturbed_name): x for p, x in zip(passes, predictions)}
        expected: Tensor = theirs.forward(**named).pred
        got = ours.combine(predictions, state=state, step_index=step, num_steps=steps)
        assert got.shape == expected.shape
        worst = max(worst, (got - expected).abs().max().item())
    return worst


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"guidance_scale": 4.0, "guidance_rescale": 0.7},
        {"guidance_scale": 3.0, "use_original_formulation": True, "start": 0.2, "stop": 0.7},
        {"guidance_scale": 1.0},
        {"enabled": False},
    ],
)
def test_classifier_free(settings: dict[str, Any]) -> None:
    diff = compare(ClassifierFreeGuidance(**settings), dg.ClassifierFreeGuidance(**settings))
    assert diff <= TOLERANCE


@pytest.mark.parametrize(
    "settings",
    [
        {"zero_init_steps": 2},
        {"zero_init_steps": 0, "guidance_rescale": 0.5, "guidance_scale": 5.0},
        {"zero_init_steps": 1, "use_original_formulation": True, "stop": 0.5},
    ],
)
def test_cfg_zero_star(settings: dict[str, Any]) -> None:
    ours = ClassifierFreeZeroStarGuidance(**settings)
    theirs = dg.ClassifierFreeZeroStarGuidance(**settings)
    # Zero-initialised steps need no unconditional prediction: we make one forward, diffusers two.
    state = None
    for step in range(STEPS):
        theirs.set_state(step, STEPS, None)
        cond, uncond = torch.randn(SHAPE), torch.randn(SHAPE)
        passes = ours.passes(step, STEPS)
        got = ours.combine([cond, uncond][: len(passes)], state=state, step_index=step, num_steps=STEPS)
        expected = theirs.forward(cond, uncond).pred
        assert (got - expected).abs().max().item() <= TOLERANCE
        zero_init = step < ours.zero_init_steps
        assert len(passes) == (1 if zero_init else theirs.num_conditions)


@pytest.mark.parametrize(
    "settings",
    [
        {"adaptive_projected_guidance_momentum": -0.5, "adaptive_projected_guidance_rescale": 15.0},
        {"adaptive_projected_guidance_momentum": 0.3, "eta": 0.0, "adaptive_projected_guidance_rescale": 40.0},
        {"adaptive_projected_guidance_momentum": None, "eta": 0.5, "guidance_rescale": 0.3, "start": 0.3},
        {"adaptive_projected_guidance_norm_dim": (-2, -1), "adaptive_projected_guidance_momentum": -0.5},
    ],
)
def test_adaptive_projected_momentum_over_steps(settings: dict[str, Any]) -> None:
    ours = AdaptiveProjectedGuidance(**settings)
    assert compare(ours, dg.AdaptiveProjectedGuidance(**settings)) <= TOLERANCE
    # A second call with fresh state reproduces diffusers again (its buffer resets at step 0).
    assert compare(ours, dg.AdaptiveProjectedGuidance(**settings)) <= TOLERANCE


def test_adaptive_projected_state_is_per_call() -> None:
    apg = AdaptiveProjectedGuidance(adaptive_projected_guidance_momentum=-0.5)
    first, second = apg.new_state(), apg.new_state()
    assert isinstance(first, MomentumState) and first is not second
    cond, uncond = torch.randn(SHAPE), torch.randn(SHAPE)
    apg.combine([cond, uncond], state=first, step_index=0, num_steps=STEPS)
    assert first.average is not None and second is not None and second.average is None
    with pytest.raises(ValueError, match="new_state"):
        apg.combine([cond, uncond], state=None, step_index=1, num_steps=STEPS)
    assert AdaptiveProjectedGuidance().new_state() is None


@pytest.mark.parametrize("settings", [{}, {"guidance_scale": 3.0, "guidance_rescale": 0.5, "stop": 0.6}])
def test_tangential(settings: dict[str, Any]) -> None:
    ours = TangentialClassifierFreeGuidance(**settings)
    assert compare(ours, dg.TangentialClassifierFreeGuidance(**settings)) <= 1e-5


@pytest.mark.parametrize("settings", [{}, {"alpha": 2.0, "use_original_formulation": True, "start": 0.1}])
def test_magnitude_aware(settings: dict[str, Any]) -> None:
    # Diffusers' torch.norm over three dims fails on torch 2.13, so compare on token-shaped predictions.
    ours, theirs = MagnitudeAwareGuidance(**settings), dg.MagnitudeAwareGuidance(**settings)
    diff = compare(ours, theirs, shape=(2, 16, 8))
    assert diff <= TOLERANCE


PERTURBED_SETTINGS = [
    {},
    {"guidance_scale": 1.0, "start": 0.0, "stop": 1.0},  # perturbed term only
    {"guidance_scale": 5.0, "guidance_rescale": 0.4, "start": 0.3, "stop": 0.9},
]


@pytest.mark.parametrize("settings", PERTURBED_SETTINGS)
def test_perturbed_attention(settings: dict[str, Any]) -> None:
    extra = {"perturbed_guidance_start": 0.0, "perturbed_guidance_stop": 0.6, "perturbed_guidance_scale": 3.0}
    ours = PerturbedAttentionGuidance(perturbed_guidance_layers=[1], **extra, **settings)
    theirs = dg.PerturbedAttentionGuidance(perturbed_guidance_layers=[1], **extra, **settings)
    assert compare(ours, theirs) <= TOLERANCE


@pytest.mark.parametrize("settings", PERTURBED_SETTINGS)
def test_skip_layer(settings: dict[str, Any]) -> None:
    extra = {"skip_layer_guidance_start": 0.1, "skip_layer_guidance_stop": 0.5}
    ours = SkipLayerGuidance(skip_layer_guidance_layers=[7, 8], **extra, **settings)
    theirs = dg.SkipLayerGuidance(skip_layer_guidance_layers=[7, 8], **extra, **settings)
    assert compare(ours, theirs) <= TOLERANCE


@pytest.mark.parametrize("settings", PERTURBED_SETTINGS)
def test_smoothed_energy(settings: dict[str, Any]) -> None:
    extra = {"seg_guidance_scale": 2.0, "seg_guidance_stop": 0.8}
    ours = SmoothedEnergyGuidance(seg_guidance_layers=[1], **extra, **settings)
    theirs = dg.SmoothedEnergyGuidance(seg_guidance_layers=[1], **extra, **settings)
    assert compare(ours, theirs, perturbed_name="pred_cond_seg") <= TOLERANCE


@pytest.mark.parametrize("settings", [{}, {"guidance_scale": 3.0, "guidance_rescale": 0.5, "stop": 0.5}])
def test_auto_guidance(settings: dict[str, Any]) -> None:
    ours = AutoGuidance(auto_guidance_layers=[0], dropout=0.3, **settings)
    theirs = dg.AutoGuidance(auto_guidance_layers=[0], dropout=0.3, **settings)
    assert compare(ours, theirs) <= TOLERANCE
    assert [p.condition for p in ours.passes(0, STEPS)] == ["cond", "uncond"]
    paper = AutoGuidance(auto_guidance_layers=[0], weak_condition="cond")
    assert [p.condition for p in paper.passes(0, STEPS)] == ["cond", "cond"]


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"guidance_scales": [7.0, 4.0, 2.0], "parallel_weights": 0.5, "guidance_rescale": 0.3},
        {
            "guidance_scales": [6.0, 3.0],
            "start": [0.3, 0.3],
            "stop": [0.8, 0.8],
            "guidance_rescale": [0.2, 0.4],
            "guidance_rescale_space": "freq",
            "use_original_formulation": True,
        },
    ],
)
def test_frequency_decoupled(settings: dict[str, Any]) -> None:
    pytest.importorskip("kornia")
    ours = FrequencyDecoupledGuidance(**settings)
    theirs = dg.FrequencyDecoupledGuidance(**settings)
    assert compare(ours, theirs) <= 1e-5


def test_frequency_decoupled_level_windows() -> None:
    # Diffusers 0.42.1 fails when a level is outside its window, so check the rule directly.
    fdg = FrequencyDecoupledGuidance(guidance_scales=(6.0, 3.0), start=(0.0, 0.5))
    cond, uncond = torch.randn(SHAPE), torch.randn(SHAPE)
    (c0, c1), (u0, _) = laplacian_pyramid(cond, 2), laplacian_pyramid(uncond, 2)
    expected = collapse([u0 + 6.0 * (c0 - u0), c1])
    got = fdg.combine([cond, uncond], state=None, step_index=1, num_steps=STEPS)
    assert (got - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("size", [(16, 16), (12, 20), (9, 7)])
def test_laplacian_pyramid_collapses_back(size: tuple[int, int]) -> None:
    image = torch.randn(2, 3, *size)
    rebuilt = collapse(laplacian_pyramid(image, 3))[..., : size[0], : size[1]]
    assert (rebuilt - image).abs().max().item() < 1e-5
    fdg = FrequencyDecoupledGuidance(guidance_scales=(1.5, 1.2, 1.0))
    cond, uncond = torch.randn(1, 4, *size), torch.randn(1, 4, *size)
    assert fdg.combine([cond, uncond], state=None, step_index=0, num_steps=STEPS).shape == cond.shape


def test_window_and_noop_scale_need_only_the_conditional_pass() -> None:
    cfg = ClassifierFreeGuidance(start=0.2, stop=0.5)
    counts = [len(cfg.passes(step, 10)) for step in range(10)]
    assert counts == [1, 1, 2, 2, 2, 1, 1, 1, 1, 1]
    assert all(len(ClassifierFreeGuidance(guidance_scale=1.0).passes(s, 10)) == 1 for s in range(10))
    original = ClassifierFreeGuidance(guidance_scale=0.0, use_original_formulation=True)
    assert len(original.passes(0, 10)) == 1
    pag = PerturbedAttentionGuidance.for_family("sdxl", guidance_scale=1.0)
    # 0.01 and 0.2 of 50 steps: the perturbed term acts on steps 1..9 (exclusive start, as diffusers).
    assert [s for s in range(50) if len(pag.passes(s, 50)) == 2] == list(range(1, 10))
    cond = torch.randn(SHAPE)
    assert cfg.combine([cond], state=None, step_index=0, num_steps=10) is cond


def test_invalid_settings_raise_with_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"stop must be in \[start, 1\] = \[0.6, 1\], got 0.3"):
        ClassifierFreeGuidance(start=0.6, stop=0.3)
    with pytest.raises(ValueError, match="guidance_rescale must be in"):
        ClassifierFreeGuidance(guidance_rescale=1.5)
    with pytest.raises(ValueError, match="has 3 values but guidance_scales has 2"):
        FrequencyDecoupledGuidance(start=(0.0, 0.1, 0.2))
    with pytest.raises(ValueError, match=r"dropout must be in \(0, 1\], got 0.0"):
        AutoGuidance(family="flux", dropout=0.0)
    with pytest.raises(ValueError, match="family="):
        SkipLayerGuidance()
    with pytest.raises(ValueError, match=r"got \[0.5, 0.2\]"):
        PerturbedAttentionGuidance(family="sd15", perturbed_guidance_start=0.5, perturbed_guidance_stop=0.2)
