"""Each family's denoiser wrapper equals a direct call of its model, and the predict blocks run through it."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from torch import Tensor

from diffblocks.blocks.flux import PredictFlow, PrepareFluxConditions, PrepareFluxGuidance
from diffblocks.blocks.standard import PredictNoise
from diffblocks.blocks.standard.guidance import Guidance
from diffblocks.components.denoisers import AbstractDenoiser, Conditioning, FluxDenoiser, UNetDenoiser
from diffblocks.components.guiders import ClassifierFreeGuidance, GuidanceConditions
from diffblocks.components.models.flux import FluxParams, FluxTransformer2DModel, prepare_image_ids, prepare_text_ids
from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.components.schedulers.ddim import DDIMScheduler
from tests.guiders.tiny_denoisers import TINY_FLUX_CONFIG, TINY_UNET_CONFIG

SDXL_CONFIG: dict[str, Any] = {
    **TINY_UNET_CONFIG,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 4 + 6 * 8,
}


def unet(config: dict[str, Any] = TINY_UNET_CONFIG) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(config).eval()


def flux(*, guidance_embeds: bool) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(FluxParams(**{**TINY_FLUX_CONFIG, "guidance_embeds": guidance_embeds})).eval()


_NOISE = torch.Generator().manual_seed(3)


def randn(*shape: int) -> Tensor:
    return torch.randn(*shape, generator=_NOISE)


def test_the_denoisers_are_abstract_or_final() -> None:
    assert inspect.isabstract(AbstractDenoiser) and not inspect.isabstract(UNetDenoiser) and not inspect.isabstract(FluxDenoiser)
    assert UNetDenoiser(unet()).prediction_type == "epsilon"
    assert UNetDenoiser(unet(), prediction_type="v_prediction").prediction_type == "v_prediction"
    assert FluxDenoiser(flux(guidance_embeds=False)).prediction_type == "flow"


@torch.no_grad()
def test_unet_denoiser_is_the_direct_call() -> None:
    model, x, t = unet(), randn(2, 4, 8, 8), torch.tensor(10)
    embeds, mask = randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    denoiser = UNetDenoiser(model)
    assert (denoiser(x, t, Conditioning(embeds)) - model(x, t, embeds)).abs().max().item() == 0.0
    masked = Conditioning(embeds, prompt_mask=mask)
    direct = model(x, t, embeds, encoder_attention_mask=mask)
    assert (denoiser(x, t, masked) - direct).abs().max().item() == 0.0
    assert (denoiser.at(t)(x, masked) - direct).abs().max().item() == 0.0


@torch.no_grad()
def test_unet_denoiser_gives_sdxl_its_added_embedding_and_controlnet_its_residuals() -> None:
    model, x, t = unet(SDXL_CONFIG), randn(2, 4, 8, 8), torch.tensor([999, 999])
    embeds, pooled = randn(2, 5, 16), randn(2, 4)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    # one residual per skip connection (conv_in; a resnet and a downsample; the last level's resnet), one for the mid block
    down = (randn(2, 16, 8, 8), randn(2, 16, 8, 8), randn(2, 16, 4, 4), randn(2, 32, 4, 4))
    mid = randn(2, 32, 4, 4)
    conditioning = Conditioning(embeds, pooled_embeds=pooled, time_ids=time_ids, control_residuals=(*down, mid))
    got = UNetDenoiser(model)(x, t, conditioning)
    direct = model(
        x,
        t,
        embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
    )
    assert (got - direct).abs().max().item() == 0.0
    without = model(x, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    assert (got - without).abs().max().item() > 1e-3  # the residuals did reach the UNet


def test_unet_denoiser_refuses_image_embeds_it_cannot_read() -> None:
    conditioning = Conditioning(randn(1, 5, 16), image_embeds=(randn(1, 4, 16),))
    with pytest.raises(ValueError, match="image_embeds is set, but no IP-Adapter is attached"):
        UNetDenoiser(unet())(randn(1, 4, 8, 8), torch.tensor(10), conditioning)


def flux_conditioning(batch: int, *, guidance: float | None) -> Conditioning:
    return Conditioning(
        randn(batch, 6, 16),
        pooled_embeds=randn(batch, 8),
        text_ids=prepare_text_ids(6),
        image_ids=prepare_image_ids(4, 3),
        embedded_guidance=None if guidance is None else torch.tensor([guidance]),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_flux_denoiser_is_the_direct_call_as_diffusers_makes_it(dtype: torch.dtype) -> None:
    model = flux(guidance_embeds=True).to(dtype)
    c = flux_conditioning(2, guidance=3.5).to(dtype=dtype)
    x, t = randn(2, 12, 8).to(dtype), torch.tensor(733.0)
    # FluxPipeline: timestep = t.expand(batch).to(latents.dtype), passed as timestep / 1000
    direct = model(
        x,
        encoder_hidden_states=c.prompt_embeds,
        pooled_projections=c.pooled_embeds,
        timestep=t.expand(2).to(dtype) / 1000,
        img_ids=c.image_ids,
        txt_ids=c.text_ids,
        guidance=torch.tensor([3.5, 3.5]).to(dtype),
    )
    denoiser = FluxDenoiser(model)
    assert (denoiser(x, t, c) - direct).abs().max().item() == 0.0
    assert (denoiser.at(t.to(dtype))(x, c) - direct).abs().max().item() == 0.0


@torch.no_grad()
def test_flux_denoiser_names_what_is_missing_or_unsupported() -> None:
    denoiser, x, t = FluxDenoiser(flux(guidance_embeds=False)), randn(1, 12, 8), torch.tensor(500.0)
    with pytest.raises(ValueError, match="image_ids is None"):
        denoiser(x, t, Conditioning(randn(1, 6, 16), pooled_embeds=randn(1, 8), text_ids=prepare_text_ids(6)))
    c = flux_conditioning(1, guidance=None)
    blocks = denoiser.model.params.num_layers + denoiser.model.params.num_single_layers
    with pytest.raises(ValueError, match=f"block_residuals has {blocks + 1} tensors, but the transformer takes one per"):
        denoiser(x, t, Conditioning(c.prompt_embeds, pooled_embeds=c.pooled_embeds, text_ids=c.text_ids,
                                    image_ids=c.image_ids, control_residuals=(randn(1, 12, 8),) * (blocks + 1)))


@torch.no_grad()
def test_predict_noise_runs_the_unet_denoiser_with_the_schedulers_prediction_type() -> None:
    model, x, t = unet(), randn(1, 4, 8, 8), torch.tensor(500.0)
    cond, uncond = Conditioning(randn(1, 5, 16)), Conditioning(torch.zeros(1, 5, 16))
    guidance = Guidance(ClassifierFreeGuidance(guidance_scale=3.0), None, GuidanceConditions({"cond": cond, "uncond": uncond}), True)
    block = PredictNoise().bind({"unet": model, "scheduler": DDIMScheduler(prediction_type="v_prediction")})
    assert block.denoiser().prediction_type == "v_prediction"
    assert PredictNoise().bind({"unet": model}).denoiser().prediction_type == "epsilon"
    out = block(PredictNoise.Inputs(model_input=x, t=t, guidance=guidance, step_index=0, num_steps=1)).noise_pred
    text, empty = model(x, t, cond.prompt_embeds), model(x, t, uncond.prompt_embeds)
    assert torch.allclose(out, empty + 3.0 * (text - empty), atol=1e-5)


@torch.no_grad()
def test_predict_flow_runs_the_flux_denoiser_on_the_conditioning_prepare_flux_conditions_completes() -> None:
    model = flux(guidance_embeds=True)
    c = flux_conditioning(1, guidance=None)
    encoded = Conditioning(c.prompt_embeds, pooled_embeds=c.pooled_embeds)  # as FluxEncodePrompt makes it
    parts = {"transformer": model, "guider": ClassifierFreeGuidance(guidance_scale=1.0)}
    set_up = PrepareFluxGuidance().bind(parts)(PrepareFluxGuidance.Inputs(guidance_scale=4.0, num_inference_steps=1))
    guidance = PrepareFluxConditions().bind(parts)(
        PrepareFluxConditions.Inputs(
            conditioning=encoded,
            negative_conditioning=None,
            image_ids=prepare_image_ids(4, 3),
            embedded_guidance=set_up.embedded_guidance,
            call_guider=set_up.call_guider,
        )
    ).guidance
    x, t = randn(1, 12, 8), torch.tensor(600.0)
    out = PredictFlow().bind({"transformer": model})(PredictFlow.Inputs(latents=x, t=t, guidance=guidance, step_index=0, num_steps=1))
    direct = model(
        x,
        encoder_hidden_states=c.prompt_embeds,
        pooled_projections=c.pooled_embeds,
        timestep=torch.tensor([0.6]),
        img_ids=prepare_image_ids(4, 3),
        txt_ids=prepare_text_ids(6),
        guidance=torch.tensor([4.0]),
    )
    assert (out.noise_pred - direct).abs().max().item() == 0.0
