"""A budget reserves the activations of the denoiser step a call runs, planned again when the size grows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.components import ComponentsManager
from diffblocks.components.attention import attention_backend
from diffblocks.components.denoisers import Conditioning, FluxDenoiser, UNetDenoiser
from diffblocks.components.memory import ByteSize, GroupOffload, LeafOffload, ModelOffload, ModelSize, NoOffload, Placement
from diffblocks.components.memory.policies import AbstractOffload
from diffblocks.components.memory.reserve import StepNeed, held_bytes, watch_steps
from diffblocks.components.memory.steps import flux_tokens_shape, step_bytes, unet_shape
from diffblocks.components.models.flux import FluxParams, FluxTransformer2DModel, prepare_image_ids, prepare_text_ids
from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.presets.tiny.preset import builtin_model_dir

GiB = 2**30
# a 6 GiB denoiser whose five repeated blocks weigh 1 GiB each (1 GiB outside them), and a 1 GiB text encoder
SIZES = {"unet": ModelSize(6 * GiB, blocks=((GiB,) * 5,), largest_leaf=GiB // 8), "text_encoder": ModelSize(GiB, largest_leaf=GiB // 16)}


def _plan_with(budget: str, need: float | None, *, policy: AbstractOffload | None = None, activations: str | None = None) -> object:
    placement = Placement(budget=budget, policy=policy, activations=activations, on_step=lambda _need: None)
    if need is not None:
        placement.reserve(StepNeed(ByteSize(int(need * GiB)), "a step of unet"))
    return placement.make_plan(lambda: SIZES, torch.device("cpu"))


@pytest.mark.parametrize(
    ("budget", "need", "policy", "reserved", "kept"),
    [
        ("8GiB", None, NoOffload(), 0, 0),  # no call has run: nothing reserved yet
        ("8GiB", 0.5, NoOffload(), 0.5, 0),  # 7 GiB of weights and the step fit
        ("8GiB", 2, ModelOffload(), 2, 0),  # the weights fit, the weights and the step do not: one model at a time
        ("8GiB", 3, GroupOffload(1), 3, 1),  # 2 GiB outside the blocks, two groups streamed, one more kept in the spare
        ("8GiB", 4, GroupOffload(1), 4, 0),  # the step takes the spare budget that kept a group
        ("8GiB", 5, GroupOffload(1, prefetch=False), 5, 0),
        ("8GiB", 7.5, LeafOffload(), 7.5, 0),
    ],
)
def test_the_plan_reserves_the_step_and_picks_the_policy_that_fits_beside_it(
    budget: str, need: float | None, policy: AbstractOffload, reserved: float, kept: float
) -> None:
    plan = _plan_with(budget, need)
    assert plan.policy == policy
    assert plan.activations == int(reserved * GiB) and sum(plan.kept.values()) == int(kept * GiB)
    assert plan.peak + plan.activations <= plan.budget


def test_the_plan_says_what_it_reserved_and_why() -> None:
    text = str(_plan_with("8GiB", 2))
    assert "  2.0 GiB of the budget reserved for activations: a step of unet" in text
    assert "   NoOffload(): 7.0 GiB at most on cpu, does not fit" in text  # 7 GiB of weights fit 8, not 6 beside the step
    assert "-> ModelOffload(): 6.0 GiB at most on cpu, fits" in text


def test_a_plan_before_any_call_says_when_the_step_will_be_reserved() -> None:
    assert "  nothing reserved for activations yet: the first denoiser step of a call estimates its own" in str(_plan_with("8GiB", None))
    assert "reserved for activations" not in str(Placement(policy=ModelOffload()).make_plan(lambda: SIZES, torch.device("cpu")))
    assert "1.0 GiB of the budget reserved for activations: activations= given" in str(_plan_with("8GiB", None, activations="1GiB"))


def test_a_step_no_placement_leaves_room_for_gets_what_the_smallest_leaves() -> None:
    plan = _plan_with("8GiB", 9)
    assert plan.policy == LeafOffload() and plan.activations == 8 * GiB - GiB // 8 and plan.needed == 9 * GiB
    assert "(of 9.0 GiB estimated: no placement leaves more; an out-of-memory error tightens the plan further)" in str(plan)


def test_a_given_policy_keeps_its_place_and_the_step_gets_what_it_leaves() -> None:
    plan = _plan_with("8GiB", 3, policy=NoOffload())
    assert plan.policy == NoOffload() and plan.activations == GiB and plan.needed == 3 * GiB


def test_the_reservation_only_grows_and_an_explicit_one_wins() -> None:
    placement = Placement(budget="8GiB", on_step=lambda _need: None)
    assert placement.reserve(StepNeed(ByteSize(2 * GiB), "large"))
    assert not placement.reserve(StepNeed(ByteSize(GiB), "small"))  # a smaller call keeps the larger plan
    assert placement.step is not None and placement.step.why == "large"
    explicit = Placement(budget="8GiB", activations="1GiB", on_step=lambda _need: None)
    assert not explicit.reserve(StepNeed(ByteSize(2 * GiB), "large"))
    assert explicit.make_plan(lambda: SIZES, torch.device("cpu")).activations == GiB
    no_budget = Placement(policy=ModelOffload(), on_step=lambda _need: None)  # nothing to reserve a part of
    assert not no_budget.reserve(StepNeed(ByteSize(1), "no budget"))


def _tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel.from_config({"block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4,
                                             "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                                             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
                                             "cross_attention_dim": 8, "attention_head_dim": 2}).eval()


def test_the_unet_denoiser_reports_its_forward_batch_backend_and_dtype_once_per_size() -> None:
    unet, needs = _tiny_unet(), []
    watch_steps(unet, "unet", needs.append)
    denoiser = UNetDenoiser(unet)
    x, embeds = torch.randn(2, 4, 16, 8), torch.randn(2, 5, 8)  # two samples: classifier-free guidance batched
    with torch.no_grad():
        for _ in range(2):
            denoiser(x, torch.tensor(10), Conditioning(embeds))
        with attention_backend("reference"):
            denoiser(x, torch.tensor(10), Conditioning(embeds))
    shape = unet_shape(unet.to_config(), height=16 * 8, width=8 * 8)
    assert [need.nbytes for need in needs] == [step_bytes(shape, batch=2, itemsize=4),
                                               step_bytes(shape, batch=2, backend="reference", itemsize=4)]
    assert "a step of unet with 2 sample(s) at once" in needs[0].why and "sdpa attention, float32" in needs[0].why
    watch_steps(unet, "unet", None)


def test_controlnet_residuals_held_through_the_step_are_reserved_beside_it() -> None:
    unet, needs = _tiny_unet(), []
    watch_steps(unet, "unet", needs.append)
    x, embeds = torch.randn(2, 4, 16, 8), torch.randn(2, 5, 8)
    # conv_in's, the first resnet's, the downsampler's, the second resnet's, then the mid block's
    shapes = [(2, 8, 16, 8), (2, 8, 16, 8), (2, 8, 8, 4), (2, 16, 8, 4), (2, 16, 8, 4)]
    residuals = tuple(torch.zeros(shape) for shape in shapes)
    with torch.no_grad():
        UNetDenoiser(unet)(x, torch.tensor(10), Conditioning(embeds))
        UNetDenoiser(unet)(x, torch.tensor(10), Conditioning(embeds, control_residuals=residuals))
    plain = step_bytes(unet_shape(unet.to_config(), height=16 * 8, width=8 * 8), batch=2, itemsize=4)
    held = sum(r.numel() * 4 for r in residuals)
    assert [need.nbytes for need in needs] == [plain, plain + held]
    assert needs[1].why.endswith(f"and {ByteSize(held)} of ControlNet residuals held through it")
    watch_steps(unet, "unet", None)


def test_a_residual_handed_to_several_blocks_is_held_once() -> None:
    one, other = torch.zeros(2, 3), torch.zeros(4)
    assert held_bytes((one, one, other, one[:1])) == (6 + 4) * 4  # a view shares its base's storage
    assert held_bytes(None) == 0
    meta = [torch.empty(10, device="meta"), torch.empty(20, device="meta")]  # no storage to tell them apart: each counts
    assert held_bytes(meta) == 30 * 4
    assert held_bytes([torch.nn.Parameter(torch.zeros(3))]) == 12  # a subclass counts its own bytes


def test_the_flux_denoiser_counts_the_text_tokens_it_attends_over_jointly() -> None:
    transformer = FluxTransformer2DModel(FluxParams(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                                    num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                                    axes_dims_rope=(2, 2, 4), guidance_embeds=False)).eval()
    needs: list[StepNeed] = []
    watch_steps(transformer, "transformer", needs.append)
    c = Conditioning(torch.randn(1, 5, 16), pooled_embeds=torch.randn(1, 8), text_ids=prepare_text_ids(5), image_ids=prepare_image_ids(2, 3))
    with torch.no_grad():
        FluxDenoiser(transformer)(torch.randn(1, 6, 8), torch.tensor(700.0), c)
    expected = step_bytes(flux_tokens_shape(transformer.to_config(), image_tokens=6, text_tokens=5), batch=1, itemsize=4)
    assert [need.nbytes for need in needs] == [expected] and "11 tokens of 16 channels" in needs[0].why


def test_a_budget_that_fits_the_weights_but_not_a_big_calls_step_picks_a_tighter_policy() -> None:
    kwargs = dict(prompt="a small green cross in the center", num_inference_steps=2, progress=False)
    manager = ComponentsManager(device="cpu", memory_budget="150MiB")  # 142.2 MiB of weights: all fit on the device
    pipe = Pipeline.from_pretrained(builtin_model_dir(), manager=manager)
    assert manager.plan().policy == NoOffload() and manager.plan().activations == 0
    pipe(**kwargs)  # the default 128² image: a 3.3 MiB step fits beside every weight
    assert manager.plan().policy == NoOffload() and str(manager.plan().activations) == "3.3 MiB"
    image = pipe(**kwargs, height=256, width=256, generator=torch.Generator().manual_seed(0)).images[0]
    plan = manager.plan()  # 52.5 MiB for the step at 256² (64² latents, two passes batched): NoOffload no longer fits
    assert plan.policy == ModelOffload() and str(plan.activations) == "52.5 MiB"
    assert "52.5 MiB of the budget reserved for activations: a step of unet with 2 sample(s) at once" in str(plan)
    pipe(**kwargs)  # a smaller call again: the plan stays
    assert manager.plan() == plan
    # the same plan made ahead, by hand: the same image (the VAE decodes in the same room)
    fixed = ComponentsManager(device="cpu", memory_budget="150MiB", activations=int(plan.activations))
    same = Pipeline.from_pretrained(builtin_model_dir(), manager=fixed)(**kwargs, height=256, width=256,
                                                                        generator=torch.Generator().manual_seed(0)).images[0]
    assert fixed.plan().policy == ModelOffload() and np.array_equal(np.asarray(image), np.asarray(same))
