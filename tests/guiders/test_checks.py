"""Settings that cannot work fail when the guider is built or checked, before any denoising step."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import guiders as dg

from diffblocks.blocks.errors import FieldError
from diffblocks.blocks.standard import PrepareGuidance
from diffblocks.components.denoisers import Conditioning
from diffblocks.components.guiders import (
    AdaptiveProjectedGuidance,
    AutoGuidance,
    ClassifierFreeGuidance,
    FrequencyDecoupledGuidance,
    MagnitudeAwareGuidance,
    PerturbedAttentionGuidance,
    SkipLayerGuidance,
    SmoothedEnergyGuidance,
)
from diffblocks.components.guiders.pyramid import collapse, laplacian_pyramid, max_levels
from tests.guiders.tiny_denoisers import tiny_unet

CONDITION_GUIDERS = (PerturbedAttentionGuidance, SkipLayerGuidance, SmoothedEnergyGuidance)


@pytest.mark.parametrize("cls", CONDITION_GUIDERS)
def test_flux_family_turns_cfg_off_and_keeps_the_perturbed_term(cls: Any) -> None:
    guider = cls.for_family("flux")
    assert guider.guidance_scale == 1.0 and not guider.guides(5, 10)
    steps = [[p.condition for p in guider.passes(i, 10)] for i in range(10)]
    assert all(conditions in (["cond"], ["cond", "cond"]) for conditions in steps)  # never "uncond"
    assert ["cond", "cond"] in steps
    assert cls(family="flux") == guider  # the family implies it however the guider is made
    assert cls.for_family("flux", guidance_scale=4.0).guidance_scale == 4.0  # given settings win
    assert cls.for_family("sdxl").guidance_scale == 7.5  # other families keep diffusers' default
    assert cls.from_config(guider.to_config()) == guider


def test_flux_perturbed_only_step_matches_diffusers() -> None:
    ours = PerturbedAttentionGuidance.for_family("flux", perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0)
    theirs = dg.PerturbedAttentionGuidance(
        guidance_scale=1.0, perturbed_guidance_scale=2.8, perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0,
        perturbed_guidance_layers=[1],
    )
    theirs.set_state(3, 10, None)
    cond, perturbed = torch.randn(2, 12, 64), torch.randn(2, 12, 64)
    assert theirs.num_conditions == len(ours.passes(3, 10)) == 2
    expected = theirs.forward(pred_cond=cond, pred_cond_skip=perturbed).pred
    got = ours.combine([cond, perturbed], state=None, step_index=3, num_steps=10)
    assert (got - expected).abs().max().item() <= 1e-6


def test_flux_auto_guidance_guides_from_the_prompt() -> None:
    guider = AutoGuidance.for_family("flux")
    assert (guider.weak_condition, guider.guidance_scale) == ("cond", 2.8)
    assert [p.condition for p in guider.passes(0, 10)] == ["cond", "cond"]
    assert AutoGuidance.for_family("flux", weak_condition="uncond").weak_condition == "uncond"


def test_negative_scales_where_they_mean_nothing_are_refused() -> None:
    for cls, field in zip(CONDITION_GUIDERS, ("perturbed_guidance_scale", "skip_layer_guidance_scale", "seg_guidance_scale")):
        with pytest.raises(ValueError, match=rf"{field} must be >= 0 \(0 turns the perturbed term off\), got -1.0"):
            cls.for_family("sdxl", **{field: -1.0})
        assert not cls.for_family("sdxl", **{field: 0.0}).perturbs(5, 10)
    with pytest.raises(ValueError, match=r"alpha must be >= 0 \(0 is plain CFG\), got -2.0"):
        MagnitudeAwareGuidance(alpha=-2.0)
    # a negative CFG scale is meaningful (it guides away from the prompt): kept
    cfg = ClassifierFreeGuidance(guidance_scale=-2.0)
    cond, uncond = torch.ones(1, 4), torch.zeros(1, 4)
    assert torch.equal(cfg.combine([cond, uncond], state=None, step_index=0, num_steps=1), -2.0 * cond)
    assert FrequencyDecoupledGuidance(guidance_scales=(-1.0, 2.0)).guidance_scales == (-1.0, 2.0)
    assert AdaptiveProjectedGuidance(guidance_scale=-1.0, eta=-0.5).eta == -0.5


def test_apg_norm_dims_are_checked_against_the_prediction_layout() -> None:
    apg = AdaptiveProjectedGuidance(adaptive_projected_guidance_norm_dim=(1, 3))
    apg.check_predictions((None,) * 4)
    with pytest.raises(ValueError, match=r"norm_dim \(1, 3\) names dim 3, but this model's predictions have 3 dims: "
                                         r"use dims in \[-3, 2\], e.g. \(1, 2\)"):
        apg.check_predictions((None,) * 3)
    with pytest.raises(ValueError, match=r"predictions \(2, 16, 8\) have 3 dims"):
        apg.combine([torch.randn(2, 16, 8)] * 2, state=None, step_index=0, num_steps=1)
    AdaptiveProjectedGuidance(adaptive_projected_guidance_norm_dim=-1).check_predictions((1, 16, 8))
    with pytest.raises(ValueError, match="norm_dim is empty"):
        AdaptiveProjectedGuidance(adaptive_projected_guidance_norm_dim=())


def test_max_levels_is_exactly_what_the_pyramid_can_split() -> None:
    for height in range(1, 18):
        for width in range(1, 18):
            for levels in range(1, 6):
                image = torch.zeros(1, 1, height, width)
                try:
                    collapse(laplacian_pyramid(image, levels))
                    works = True
                except RuntimeError:
                    works = False
                assert works == (levels <= max_levels(height, width)), (height, width, levels)


def test_fdg_refuses_packed_tokens_and_too_many_levels() -> None:
    fdg = FrequencyDecoupledGuidance(guidance_scales=(8.0, 4.0, 2.0))
    fdg.check_predictions((1, 4, 16, 12))
    with pytest.raises(ValueError, match=r"but this model's are 3-D: packed tokens \(batch, tokens, channels\)"):
        fdg.check_predictions((None,) * 3)
    with pytest.raises(ValueError, match=r"guidance_scales has 3 levels but a 4x4 latent splits into at most 2 "
                                         r"\(each level halves it; the coarsest needs 2x2\): give at most 2 scales"):
        fdg.check_predictions((1, 4, 4, 4))
    with pytest.raises(ValueError, match="a 4x4 latent splits into at most 2"):  # not a padding RuntimeError
        fdg.combine([torch.randn(1, 4, 4, 4)] * 2, state=None, step_index=0, num_steps=1)


def prepare(guider: Any, unet: Any = None) -> PrepareGuidance:
    return PrepareGuidance().bind({"guider": guider} if unet is None else {"guider": guider, "unet": unet})


def nothing_given() -> PrepareGuidance.Inputs:
    """Inputs as a check sees them when the call gives none of the block's inputs."""
    return PrepareGuidance.Inputs.model_construct()


def test_prepare_guidance_checks_the_guider_before_the_call() -> None:
    unet = tiny_unet()
    prepare(PerturbedAttentionGuidance.for_family("sdxl"), unet).check(nothing_given())
    with pytest.raises(FieldError, match=r"SkipLayerGuidance skip_layer_guidance_layers: SkipBlocks: .* no submodule "
                                         r"'mid_block.attentions.4'; 'mid_block.attentions' has children \['0'\].* Fix: ") as caught:
        prepare(SkipLayerGuidance(skip_layer_guidance_layers=["mid_block.attentions.4"]), unet).check(nothing_given())
    assert caught.value.field == "guider"
    prepare(SkipLayerGuidance(skip_layer_guidance_layers=["mid_block.attentions.4"])).check(nothing_given())  # no unet: not checked
    with pytest.raises(FieldError, match="names dim 4"):
        prepare(AdaptiveProjectedGuidance(adaptive_projected_guidance_norm_dim=4)).check(nothing_given())
    fdg = FrequencyDecoupledGuidance(guidance_scales=(8.0, 4.0, 2.0))
    with pytest.raises(FieldError, match="a 4x4 latent"):  # user latents are known at check time
        prepare(fdg).check(PrepareGuidance.Inputs.model_construct(latents=torch.zeros(1, 4, 4, 4)))
    conditions = Conditioning(torch.zeros(1, 5, 16))
    inputs: dict[str, Any] = {"conditioning": conditions, "negative_conditioning": conditions}
    prepare(fdg)(PrepareGuidance.Inputs(**inputs, latents=torch.zeros(1, 4, 8, 8)))
    with pytest.raises(FieldError, match="a 4x4 latent splits into at most 2"):  # before the denoising loop
        prepare(fdg)(PrepareGuidance.Inputs(**inputs, latents=torch.zeros(1, 4, 4, 4)))
