"""Perturbing guiders on a tiny Flux.1-dev pipeline: family defaults run without a negative prompt, bad guiders fail up front."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from diffblocks.blocks import InputError, Pipeline
from diffblocks.components.denoisers import Conditioning
from diffblocks.components.guiders import (
    AbstractGuider,
    AdaptiveProjectedGuidance,
    AutoGuidance,
    ClassifierFreeGuidance,
    FrequencyDecoupledGuidance,
    PerturbedAttentionGuidance,
    SkipLayerGuidance,
    SmoothedEnergyGuidance,
    detach_perturbations,
    guided_prediction,
    perturbations,
)
from diffblocks.components.models.flux import prepare_image_ids, prepare_text_ids
from diffblocks.components.guiders.blur import blur_tokens
from tests.guiders.tiny_denoisers import assert_same, snapshot
from tests.presets.flux_fixtures import tiny_flux

# 64x48 pixels are a non-square 4x3 grid of tokens; ten steps put every default window's perturbed term to work
CALL: dict[str, Any] = dict(
    prompt="a red circle", height=64, width=48, num_inference_steps=10, max_sequence_length=16, output_type="np", progress=False
)
FAMILY_GUIDERS = (PerturbedAttentionGuidance, SkipLayerGuidance, SmoothedEnergyGuidance, AutoGuidance)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dev repository with a transformer of ten double-stream blocks, so Flux's default layers exist."""
    return tiny_flux(tmp_path_factory.mktemp("flux_guiders") / "dev", double_blocks=10)


@pytest.fixture(scope="module")
def pipe(repo: Path) -> Pipeline:
    return Pipeline.from_pretrained(str(repo))


def generate(pipe: Pipeline, guider: AbstractGuider, **changes: Any) -> tuple[np.ndarray, list[int]]:
    """The image and the batch size of every transformer forward."""
    pipe.update_components(guider=guider)
    batches: list[int] = []

    def count(_module: nn.Module, args: tuple[Any, ...]) -> None:
        batches.append(args[0].shape[0])

    handle = pipe.components["transformer"].register_forward_pre_hook(count)
    try:
        images = pipe(**{**CALL, **changes}, generator=torch.Generator().manual_seed(3)).images
    finally:
        handle.remove()
    return images, batches


@pytest.mark.parametrize("cls", FAMILY_GUIDERS, ids=lambda cls: cls.__name__)
def test_family_defaults_guide_flux_dev_without_a_negative_prompt(pipe: Pipeline, cls: Any) -> None:
    transformer = pipe.components["transformer"]
    detach_perturbations(transformer)  # the pipeline is shared by this module's tests
    plain, plain_batches = generate(pipe, ClassifierFreeGuidance(guidance_scale=1.0))
    before = snapshot(transformer)
    guider = cls.for_family("flux")
    guided, batches = generate(pipe, guider)
    assert plain_batches == [1] * 10
    # no unconditional pass: one plain and one perturbed forward on the steps the term acts on
    perturbed_steps = [i for i in range(10) if len(guider.passes(i, 10)) == 2]
    assert perturbed_steps and len(batches) == 10 + len(perturbed_steps) and set(batches) == {1}
    assert float(np.abs(guided - plain).max()) > 1e-3
    assert np.array_equal(generate(pipe, ClassifierFreeGuidance(guidance_scale=1.0))[0], plain)
    detach_perturbations(transformer)
    assert_same(transformer, before)


def test_perturbed_term_on_top_of_true_cfg_with_a_negative_prompt(pipe: Pipeline) -> None:
    guider = PerturbedAttentionGuidance.for_family("flux", perturbed_guidance_stop=1.0)
    _, batches = generate(pipe, guider, negative_prompt="blurry", true_cfg_scale=2.0, num_inference_steps=3)
    assert batches == [2, 2, 1, 2, 1]  # step 0: cond+uncond batched; then also the perturbed pass


def input_error(pipe: Pipeline, guider: AbstractGuider, **changes: Any) -> str:
    pipe.update_components(guider=guider)
    calls: list[int] = []
    handle = pipe.components["transformer"].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(InputError) as caught:
            pipe(**{**CALL, **changes})
    finally:
        handle.remove()
    assert not calls  # refused before any block ran
    return str(caught.value)


def test_guiders_that_cannot_run_on_flux_are_refused_up_front(pipe: Pipeline) -> None:
    message = input_error(pipe, FrequencyDecoupledGuidance(), negative_prompt="")
    assert "[prepare_flux_guidance] guider: FrequencyDecoupledGuidance splits (batch, channels, height, width)" in message
    assert "packed tokens (batch, tokens, channels), as Flux predicts" in message
    message = input_error(pipe, AdaptiveProjectedGuidance(adaptive_projected_guidance_norm_dim=3), negative_prompt="")
    assert "adaptive_projected_guidance_norm_dim 3 names dim 3, but this model's predictions have 3 dims" in message
    message = input_error(pipe, SkipLayerGuidance(skip_layer_guidance_layers=[12], guidance_scale=1.0))
    assert "skip_layer_guidance_layers: SkipBlocks: FluxTransformer2DModel has no submodule 'transformer_blocks.12'" in message
    message = input_error(pipe, SkipLayerGuidance.for_family("flux", guidance_scale=3.0))
    assert "negative_prompt: the guider SkipLayerGuidance(" in message and "guidance_scale=1" in message


def test_family_defaults_that_a_small_transformer_lacks_fail_up_front(tmp_path: Path) -> None:
    small = Pipeline.from_pretrained(str(tiny_flux(tmp_path / "dev")))  # one double-stream block
    message = input_error(small, SkipLayerGuidance.for_family("flux"))
    assert "SkipLayerGuidance the 'flux' family's default layers: SkipBlocks:" in message
    assert "'transformer_blocks' has children ['0']" in message


def test_smoothed_energy_blurs_over_the_non_square_token_grid(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    grids: list[tuple[int, int]] = []

    def spy(tokens: Tensor, grid: tuple[int, int], **settings: float) -> Tensor:
        grids.append(grid)
        return blur_tokens(tokens, grid, **settings)

    monkeypatch.setattr(perturbations, "blur_tokens", spy)
    generate(pipe, SmoothedEnergyGuidance.for_family("flux", seg_blur_sigma=1.0), num_inference_steps=3)
    assert grids == [(4, 3), (4, 3)]  # 64x48 pixels: 4 rows of 3 tokens, on steps 1 and 2


def test_a_perturbed_attention_step_matches_diffusers(repo: Path, pipe: Pipeline) -> None:
    """Our transformer and PAG against diffusers' transformer, its identity-attention mode on block 1, and its PAG rule."""
    import diffusers
    from diffusers import guiders as dg
    from diffusers.hooks.layer_skip import AttentionScoreSkipFunctionMode

    theirs = diffusers.FluxTransformer2DModel.from_pretrained(repo / "transformer").eval()
    ours = pipe.components["transformer"]
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 12, 64, generator=g)
    cond = {"encoder_hidden_states": torch.randn(1, 16, 32, generator=g), "pooled_projections": torch.randn(1, 32, generator=g)}
    shared: dict[str, Tensor] = {
        "timestep": torch.tensor([0.7]), "guidance": torch.tensor([3.5]), "img_ids": prepare_image_ids(4, 3), "txt_ids": prepare_text_ids(16)
    }

    def predict(x: Tensor, condition: Conditioning) -> Tensor:
        with torch.no_grad():
            return ours(x, encoder_hidden_states=condition.prompt_embeds, pooled_projections=condition.pooled_embeds, **shared)

    conditioning = Conditioning(cond["encoder_hidden_states"], pooled_embeds=cond["pooled_projections"])
    pag = PerturbedAttentionGuidance.for_family("flux", perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0)
    got = guided_prediction(
        pag, state=None, predict=predict, latents=latents, conditions={"cond": conditioning}, step_index=3, num_steps=10, model=ours
    )

    mode = AttentionScoreSkipFunctionMode()  # attention returns its values, inside block 1 only

    def enter(*_: Any) -> None:
        mode.__enter__()

    def leave(*_: Any) -> None:
        mode.__exit__(None, None, None)

    attn = theirs.transformer_blocks[1].attn
    with torch.no_grad():
        pred_cond = theirs(latents, **cond, **shared, return_dict=False)[0]
        handles = [attn.register_forward_pre_hook(enter), attn.register_forward_hook(leave)]
        try:
            pred_skip = theirs(latents, **cond, **shared, return_dict=False)[0]
        finally:
            for handle in handles:
                handle.remove()
    rule = dg.PerturbedAttentionGuidance(
        guidance_scale=1.0, perturbed_guidance_scale=2.8, perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0,
        perturbed_guidance_layers=[1],
    )
    rule.set_state(3, 10, None)
    expected = rule.forward(pred_cond=pred_cond, pred_cond_skip=pred_skip).pred
    assert (pred_skip - pred_cond).abs().max().item() > 1e-3
    diff = (got - expected).abs().max().item()
    print(f"PAG step on Flux vs diffusers: max abs diff {diff:.2e}")
    assert diff < 1e-5
