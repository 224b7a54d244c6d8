"""Perturbations perturb only the forwards inside their context, detach cleanly, and perturb like diffusers' own hooks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffusers.hooks import HookRegistry, LayerSkipConfig
from diffusers.hooks.layer_skip import AttentionScoreSkipFunctionMode, _apply_layer_skip_hook
from diffusers.hooks.smoothed_energy_guidance_utils import (
    SmoothedEnergyGuidanceConfig,
    _apply_smoothed_energy_guidance_hook,
    _gaussian_blur_2d,
)
from torch import Tensor, nn

from diffblocks.components.guiders import (
    AbstractPerturbation,
    IdentityAttention,
    SkipBlocks,
    SmoothedQueries,
    detach_perturbations,
)
from diffblocks.components.guiders.blur import blur_tokens, gaussian_kernel_size, ids_grid, token_grid
from tests.guiders.tiny_denoisers import flux_inputs, hook_counts, run, tiny_flux, tiny_unet, unet_inputs

UNET_MID = "mid_block.attentions.0.transformer_blocks"


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    return tiny_unet()


@pytest.fixture(scope="module")
def flux() -> nn.Module:
    return tiny_flux()


UNET_CASES: list[AbstractPerturbation] = [
    IdentityAttention(("mid_block",)),
    IdentityAttention(("down_blocks.0.attentions.0.transformer_blocks.0.attn1",)),
    SkipBlocks((UNET_MID,)),
    SkipBlocks((f"{UNET_MID}.1",), dropout=0.5),
    SmoothedQueries(("mid_block",)),
    SmoothedQueries(("down_blocks.0",), blur_sigma=1.0),
]
FLUX_CASES: list[AbstractPerturbation] = [
    IdentityAttention(("transformer_blocks.0", "single_transformer_blocks.1")),
    SkipBlocks(("transformer_blocks.1", "single_transformer_blocks.0")),
    SkipBlocks(("transformer_blocks",), dropout=0.3),
    SmoothedQueries(("transformer_blocks.1.attn",), blur_sigma=0.8),
]


def check_applied(model: nn.Module, inputs: dict[str, Tensor], perturbation: AbstractPerturbation) -> None:
    """Perturbed inside the context; outside it, before and after, bit-identical; detached, exactly as before."""
    hooks_before = hook_counts(model)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    before = run(model, inputs)
    with perturbation.applied(model):
        perturbed = run(model, inputs)
    after = run(model, inputs)
    assert torch.equal(after, before)
    assert (perturbed - before).abs().max().item() > 1e-4
    detach_perturbations(model)
    assert hook_counts(model) == hooks_before
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())


@pytest.mark.parametrize("perturbation", UNET_CASES, ids=repr)
def test_applied_unet(unet: nn.Module, perturbation: AbstractPerturbation) -> None:
    check_applied(unet, unet_inputs(), perturbation)


@pytest.mark.parametrize("perturbation", FLUX_CASES, ids=repr)
def test_applied_flux(flux: nn.Module, perturbation: AbstractPerturbation) -> None:
    check_applied(flux, flux_inputs(), perturbation)


def test_nested_and_failing_contexts_leave_the_model_unperturbed(unet: nn.Module) -> None:
    model, inputs, perturbation = unet, unet_inputs(), SkipBlocks((UNET_MID,))
    hooks_before, plain = hook_counts(model), run(model, inputs)
    with perturbation.applied(model):
        once = run(model, inputs)
        with perturbation.applied(model):  # the same perturbation again: no second set of hooks
            assert torch.equal(run(model, inputs), once)
        assert torch.equal(run(model, inputs), once)
    with pytest.raises(RuntimeError, match="out of memory"), perturbation.applied(model):
        raise RuntimeError("out of memory")
    assert torch.equal(run(model, inputs), plain)
    detach_perturbations(model)
    detach_perturbations(model)  # nothing left to take off
    with pytest.raises(ValueError, match=r"no submodule 'mid_blok'.*'mid_block'"), SkipBlocks(("mid_blok",)).applied(model):
        pass
    with pytest.raises(ValueError, match="not an attention module"), IdentityAttention(("conv_in",)).applied(model):
        pass
    assert hook_counts(model) == hooks_before


def with_diffusers_hooks(model: nn.Module, apply: Callable[[nn.Module], None], inputs: dict[str, Tensor]) -> Tensor:
    apply(model)
    try:
        return run(model, inputs)
    finally:
        HookRegistry.check_if_exists_or_initialize(model).remove_hook("oracle", recurse=True)


def with_ours(model: nn.Module, perturbation: AbstractPerturbation, inputs: dict[str, Tensor]) -> Tensor:
    try:
        with perturbation.applied(model):
            return run(model, inputs)
    finally:
        detach_perturbations(model)  # the models are shared by the tests of this module


def layer_skip(**config: Any) -> Callable[[nn.Module], None]:
    return lambda model: _apply_layer_skip_hook(model, LayerSkipConfig(**config), name="oracle")


def test_identity_attention_matches_diffusers_unet(unet: nn.Module) -> None:
    model, inputs = unet, unet_inputs(batch=2)
    oracle = layer_skip(indices=[0, 1], fqn=UNET_MID, skip_attention=False, skip_attention_scores=True, skip_ff=False)
    expected = with_diffusers_hooks(model, oracle, inputs)
    got = with_ours(model, IdentityAttention(("mid_block",)), inputs)
    assert (got - expected).abs().max().item() < 1e-6


def test_identity_attention_matches_diffusers_flux(flux: nn.Module) -> None:
    # Diffusers' layer-skip hook fails on FluxAttention (no `is_cross_attention`), so use its
    # attention-score mode on every layer: attention returns the values everywhere.
    model, inputs = flux, flux_inputs()
    with AttentionScoreSkipFunctionMode():
        expected = run(model, inputs)
    got = with_ours(model, IdentityAttention(("transformer_blocks", "single_transformer_blocks")), inputs)
    assert (got - expected).abs().max().item() < 1e-6


def test_skip_blocks_match_diffusers_unet(unet: nn.Module) -> None:
    model, inputs = unet, unet_inputs()
    expected = with_diffusers_hooks(model, layer_skip(indices=[1], fqn=UNET_MID), inputs)
    got = with_ours(model, SkipBlocks((f"{UNET_MID}.1",)), inputs)
    assert torch.equal(got, expected)


def test_dropped_blocks_match_diffusers_unet_for_the_same_seed(unet: nn.Module) -> None:
    model, inputs = unet, unet_inputs()
    torch.manual_seed(7)
    expected = with_diffusers_hooks(model, layer_skip(indices=[0, 1], fqn=UNET_MID, dropout=0.4), inputs)
    torch.manual_seed(7)
    got = with_ours(model, SkipBlocks((UNET_MID,), dropout=0.4), inputs)
    assert torch.equal(got, expected)


def test_skipped_flux_blocks_pass_both_streams_through(flux: nn.Module) -> None:
    model, inputs = flux, flux_inputs()
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            seen[name] = (hidden, context)

        return hook

    handles = [
        model.get_submodule(name).register_forward_pre_hook(record(name), with_kwargs=True)
        for name in ("transformer_blocks.1", "single_transformer_blocks.0")
    ]
    try:
        with_ours(model, SkipBlocks(("transformer_blocks.1",)), inputs)
    finally:
        for handle in handles:
            handle.remove()
    (hidden_in, context_in), (hidden_out, context_out) = (
        seen["transformer_blocks.1"],
        seen["single_transformer_blocks.0"],
    )
    assert torch.equal(hidden_in, hidden_out) and torch.equal(context_in, context_out)


def test_smoothed_queries_infinite_blur_matches_diffusers_mean(unet: nn.Module) -> None:
    # Diffusers 0.42.1 takes the mean for sigma *below* its threshold (its branches are swapped).
    model, inputs = unet, unet_inputs(batch=2)

    def oracle(m: nn.Module) -> None:
        config = SmoothedEnergyGuidanceConfig(indices=[0, 1], fqn=UNET_MID)
        _apply_smoothed_energy_guidance_hook(m, config, blur_sigma=2.0, name="oracle")

    expected = with_diffusers_hooks(model, oracle, inputs)
    got = with_ours(model, SmoothedQueries(("mid_block",)), inputs)
    assert (got - expected).abs().max().item() < 1e-6


@pytest.mark.parametrize(("sigma", "side"), [(0.5, 8), (1.0, 8), (1.5, 7), (50.0, 6)])
def test_gaussian_blur_matches_diffusers(sigma: float, side: int) -> None:
    queries = torch.randn(2, side * side, 12)
    expected = _gaussian_blur_2d(queries.clone(), gaussian_kernel_size(sigma, (99, 99)), sigma, sigma - 1)
    got = blur_tokens(queries, (side, side), sigma=sigma, threshold_inf=9999.0)
    assert (got - expected).abs().max().item() < 1e-6


def test_token_grid_follows_the_unet_latent(unet: nn.Module) -> None:
    assert token_grid(24, (8, 12)) == (4, 6)
    assert token_grid(6, (5, 11)) == (2, 3)  # 5x11 -> 3x6 -> 2x3, rounding up like stride-2 convs
    assert token_grid(16, None) == (4, 4)
    with pytest.raises(ValueError, match="24 query tokens"):
        token_grid(24, None)
    check_applied(unet, unet_inputs(height=8, width=12), SmoothedQueries(("mid_block",), blur_sigma=1.0))


def test_smoothed_queries_lay_flux_tokens_on_the_grid_of_their_img_ids(flux: nn.Module) -> None:
    # a 4x3 token grid (64x48 pixels): the blur must run over 4 rows of 3 tokens, not a square
    inputs = flux_inputs(rows=4, cols=3)
    assert ids_grid(inputs["img_ids"]) == (4, 3)
    assert ids_grid(inputs["img_ids"].to(torch.bfloat16)[None]) == (4, 3)  # batched and low-precision ids too
    target = "transformer_blocks.1.attn"

    def blurred_on(grid: tuple[int, int]) -> Tensor:
        def blur(_m: nn.Module, _args: Any, queries: Tensor) -> Tensor:
            return blur_tokens(queries, grid, sigma=1.0, threshold_inf=9999.0)

        handle = flux.get_submodule(f"{target}.to_q").register_forward_hook(blur)
        try:
            return run(flux, inputs)
        finally:
            handle.remove()

    got = with_ours(flux, SmoothedQueries((target,), blur_sigma=1.0), inputs)
    assert torch.equal(got, blurred_on((4, 3)))
    assert (got - blurred_on((3, 4))).abs().max().item() > 1e-4  # the orientation matters
    check_applied(flux, inputs, SmoothedQueries((target,), blur_sigma=1.0))


def test_smoothed_queries_on_single_stream_blocks_fail_with_the_reason(flux: nn.Module) -> None:
    # single-stream queries hold text and image tokens: 6 + 12 tokens fit no image grid
    with pytest.raises(ValueError, match=r"18 query tokens.*'transformer_blocks.N', not 'single_transformer_blocks.N'"):
        with_ours(flux, SmoothedQueries(("single_transformer_blocks.0",)), flux_inputs(rows=4, cols=3))


def test_wrong_paths_name_the_nearest_existing_module(flux: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"no submodule 'transformer_blocks.9'; 'transformer_blocks' has children \['0', '1'\]"):
        SkipBlocks(("transformer_blocks.9",)).resolve(flux)
    with pytest.raises(ValueError, match=r"no submodule 'blocks.1'; the model has children \[.*'transformer_blocks'"):
        SkipBlocks(("blocks.1",)).resolve(flux)
