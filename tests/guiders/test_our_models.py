"""The perturbing guiders' family defaults resolve on our own UNet and Flux transformer, perturb only their own passes, and detach to exactly what was there."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from diffblocks.components.denoisers import Conditioning
from diffblocks.components.guiders import (
    AbstractPerturbedGuider,
    AutoGuidance,
    PerturbedAttentionGuidance,
    SkipLayerGuidance,
    SmoothedEnergyGuidance,
    detach_perturbations,
    guided_prediction,
)
from diffblocks.components.models.flux import FluxTransformer2DModel
from diffblocks.components.models.flux.params import FluxParams
from diffblocks.components.models.unet import UNet2DConditionModel
from tests.guiders.tiny_denoisers import TINY_FLUX_CONFIG, TINY_UNET_CONFIG, assert_same, flux_inputs, snapshot, unet_inputs

GUIDERS: tuple[type[AbstractPerturbedGuider], ...] = (
    PerturbedAttentionGuidance,
    SkipLayerGuidance,
    SmoothedEnergyGuidance,
    AutoGuidance,
)
Denoiser = tuple[nn.Module, Callable[..., Tensor], dict[str, Tensor]]


@pytest.fixture(scope="module")
def unet() -> Denoiser:
    torch.manual_seed(0)
    model = UNet2DConditionModel.from_config(TINY_UNET_CONFIG).eval()
    inputs = unet_inputs(height=8, width=12)

    def predict(sample: Tensor, *, encoder_hidden_states: Tensor) -> Tensor:
        with torch.no_grad():
            return model(sample, inputs["timestep"], encoder_hidden_states)

    return model, predict, {"sample": inputs["sample"], "encoder_hidden_states": inputs["encoder_hidden_states"]}


@pytest.fixture(scope="module")
def flux() -> Denoiser:
    torch.manual_seed(0)
    # ten double-stream blocks, so Flux's default layers (transformer_blocks.1, .7-.9) exist
    params = FluxParams(**{**TINY_FLUX_CONFIG, "num_layers": 10, "num_single_layers": 1})
    model = FluxTransformer2DModel(params).eval()
    inputs = flux_inputs(rows=4, cols=3)  # a non-square 4x3 token grid
    shared = {k: inputs[k] for k in ("img_ids", "txt_ids")}

    def predict(hidden_states: Tensor, *, encoder_hidden_states: Tensor, pooled_projections: Tensor) -> Tensor:
        with torch.no_grad():
            timestep = inputs["timestep"].expand(hidden_states.shape[0])
            return model(
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                **shared,
            )

    condition = {k: inputs[k] for k in ("encoder_hidden_states", "pooled_projections")}
    return model, predict, {"hidden_states": inputs["hidden_states"], **condition}


def typed(tensors: dict[str, Tensor]) -> Conditioning:
    return Conditioning(tensors["encoder_hidden_states"], pooled_embeds=tensors.get("pooled_projections"))


def untyped(conditioning: Conditioning) -> dict[str, Tensor]:
    pooled = conditioning.pooled_embeds
    return {"encoder_hidden_states": conditioning.prompt_embeds, **({} if pooled is None else {"pooled_projections": pooled})}


CASES = [(cls, family) for cls in GUIDERS for family in ("sd15", "sdxl", "tiny", "flux")]


@pytest.mark.parametrize(("cls", "family"), CASES, ids=[f"{c.__name__}-{f}" for c, f in CASES])
def test_a_forward_outside_the_perturbed_pass_is_unperturbed_and_bit_identical(
    cls: type[AbstractPerturbedGuider], family: Any, unet: Denoiser, flux: Denoiser
) -> None:
    model, predict, inputs = flux if family == "flux" else unet
    guider = cls.for_family(family)
    guider.check_model(model)  # the family defaults resolve
    before, plain = snapshot(model), predict(**inputs)
    perturbation = guider.perturbation
    for _ in range(2):  # the second time from the hooks resolved for this model
        with perturbation.applied(model):
            perturbed = predict(**inputs)
        assert (perturbed - plain).abs().max().item() > 1e-4
        assert torch.equal(predict(**inputs), plain)
    detach_perturbations(model)
    assert_same(model, before)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_guided_steps_leave_our_model_unperturbed_and_detach_to_exactly_what_it_was(family: Any, unet: Denoiser, flux: Denoiser) -> None:
    model, predict, inputs = flux if family == "flux" else unet
    latent_name = "hidden_states" if family == "flux" else "sample"
    latents = inputs[latent_name]
    cond = {k: v for k, v in inputs.items() if k != latent_name}
    conditions = {"cond": typed(cond), "uncond": typed({k: torch.zeros_like(v) for k, v in cond.items()})}
    before, plain = snapshot(model), predict(**inputs)
    for cls in GUIDERS:
        guider = cls.for_family(family, guidance_scale=3.0)
        for step in range(4):
            guided_prediction(
                guider,
                state=None,
                predict=lambda x, c: predict(**{latent_name: x}, **untyped(c)),
                latents=latents,
                conditions=conditions,
                step_index=step,
                num_steps=4,
                model=model,
            )
        assert torch.equal(predict(**inputs), plain)
    detach_perturbations(model)
    assert_same(model, before)
