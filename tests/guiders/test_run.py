"""guided_prediction: batched and sequential passes agree, CFG is one forward, perturbations never leak out of their pass."""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from diffblocks.components.denoisers import Conditioning
from diffblocks.components.guiders import (
    AdaptiveProjectedGuidance,
    AutoGuidance,
    ClassifierFreeGuidance,
    AbstractPerturbation,
    GuidanceConditions,
    IdentityAttention,
    PerturbedAttentionGuidance,
    SkipBlocks,
    SkipLayerGuidance,
    SmoothedQueries,
    detach_perturbations,
    guided_prediction,
)
from tests.guiders.tiny_denoisers import flux_inputs, hook_counts, tiny_flux, tiny_unet, unet_inputs


class Counting:
    """A batch-independent toy denoiser that records the batch size of every call."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, latents: Tensor, conditioning: Conditioning) -> Tensor:
        self.batches.append(latents.shape[0])
        assert conditioning.pooled_embeds is not None
        shift = conditioning.prompt_embeds.mean(dim=(1, 2)) + conditioning.pooled_embeds.sum(dim=1)
        return latents * 0.5 + shift.view(-1, 1, 1, 1)


def toy_conditions(batch: int = 2) -> dict[str, Conditioning]:
    return {name: Conditioning(torch.randn(batch, 3, 4), pooled_embeds=torch.randn(batch, 4)) for name in ("cond", "uncond")}


def no_conditions() -> dict[str, Conditioning]:
    """For denoisers that ignore the conditioning."""
    nothing = Conditioning(torch.zeros(1, 1, 1))
    return {"cond": nothing, "uncond": nothing}


@pytest.mark.parametrize("wrap", [False, True])
def test_cfg_batched_is_one_forward_and_matches_sequential(wrap: bool) -> None:
    cfg = ClassifierFreeGuidance(guidance_scale=4.0, stop=0.5)
    latents, conditions = torch.randn(2, 4, 8, 8), toy_conditions()
    given = GuidanceConditions(conditions) if wrap else conditions
    common: dict[str, Any] = {
        "state": None,
        "latents": latents,
        "conditions": given,
        "num_steps": 10,
        "model": nn.Identity(),
    }
    batched, sequential = Counting(), Counting()
    out_batched = guided_prediction(cfg, predict=batched, step_index=2, **common)
    out_sequential = guided_prediction(cfg, predict=sequential, step_index=2, batched=False, **common)
    assert batched.batches == [4] and sequential.batches == [2, 2]
    cond, uncond = (Counting()(latents, conditions[name]) for name in ("cond", "uncond"))
    assert torch.allclose(out_batched, uncond + 4.0 * (cond - uncond), atol=1e-6)
    assert torch.allclose(out_batched, out_sequential, atol=1e-6)
    outside = Counting()
    out = guided_prediction(cfg, predict=outside, step_index=7, **common)
    assert outside.batches == [2] and torch.equal(out, cond)


def test_guidance_conditions_concatenate_once() -> None:
    conditions = GuidanceConditions(toy_conditions())
    first = conditions.batched(("cond", "uncond"))
    assert conditions.batched(("cond", "uncond")) is first
    assert first.pooled_embeds is not None and first.pooled_embeds.shape == (4, 4) and set(conditions) == {"cond", "uncond"}
    with pytest.raises(ValueError, match="pooled_embeds is set on 1 of 2 conditionings"):
        GuidanceConditions({"cond": Conditioning(torch.zeros(1, 2, 3), pooled_embeds=torch.zeros(1, 4)), "uncond": Conditioning(torch.zeros(1, 2, 3))})


def test_apg_state_threads_through_steps() -> None:
    apg = AdaptiveProjectedGuidance(adaptive_projected_guidance_momentum=-0.5, guidance_scale=5.0)
    latents, conditions = torch.randn(1, 4, 8, 8), GuidanceConditions(toy_conditions(batch=1))
    outputs = {}
    for batched in (True, False):
        state = apg.new_state()
        outputs[batched] = [
            guided_prediction(
                apg,
                state=state,
                predict=Counting(),
                latents=latents + step,
                conditions=conditions,
                step_index=step,
                num_steps=4,
                model=nn.Identity(),
                batched=batched,
            )
            for step in range(4)
        ]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(outputs[True], outputs[False]))


def unet_step(guider: Any, *, batched: bool) -> tuple[Tensor, list[int], nn.Module]:
    model = tiny_unet()
    inputs = unet_inputs(batch=1)
    calls: list[int] = []

    def predict(latents: Tensor, conditioning: Conditioning) -> Tensor:
        calls.append(latents.shape[0])
        with torch.no_grad():
            return model(latents, inputs["timestep"], encoder_hidden_states=conditioning.prompt_embeds, return_dict=False)[0]

    conditions = {
        "cond": Conditioning(inputs["encoder_hidden_states"]),
        "uncond": Conditioning(torch.zeros_like(inputs["encoder_hidden_states"])),
    }
    hooks, plain = hook_counts(model), forward(model, inputs)
    out = guided_prediction(
        guider,
        state=None,
        predict=predict,
        latents=inputs["sample"],
        conditions=conditions,
        step_index=3,
        num_steps=20,
        model=model,
        batched=batched,
    )
    assert torch.equal(forward(model, inputs), plain)  # a forward outside the perturbed pass
    detach_perturbations(model)
    assert hook_counts(model) == hooks
    return out, calls, model


def forward(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """A plain forward of the tiny UNet, made outside ``guided_prediction``."""
    with torch.no_grad():
        return model(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], return_dict=False)[0]


@pytest.mark.parametrize(
    "guider",
    [
        PerturbedAttentionGuidance.for_family("sdxl", perturbed_guidance_scale=3.0),
        SkipLayerGuidance.for_family("sdxl", skip_layer_guidance_start=0.0),
    ],
    ids=["pag", "slg"],
)
def test_perturbed_passes_batched_vs_sequential_on_a_unet(guider: Any) -> None:
    out_batched, calls_batched, _ = unet_step(guider, batched=True)
    out_sequential, calls_sequential, _ = unet_step(guider, batched=False)
    assert calls_batched == [2, 1] and calls_sequential == [1, 1, 1]
    # batch-2 and batch-1 convolutions round differently (~1e-6), amplified by the guidance scales
    assert (out_batched - out_sequential).abs().max().item() < 1e-4


def test_auto_guidance_on_flux_runs_the_weak_pass_perturbed() -> None:
    model, inputs = tiny_flux(), flux_inputs()
    shared = {k: inputs[k] for k in ("timestep", "img_ids", "txt_ids")}

    def predict(latents: Tensor, condition: Conditioning) -> Tensor:
        with torch.no_grad():
            timestep = shared["timestep"].expand(latents.shape[0])
            rest = {"img_ids": shared["img_ids"], "txt_ids": shared["txt_ids"]}
            texts = {"encoder_hidden_states": condition.prompt_embeds, "pooled_projections": condition.pooled_embeds}
            return model(hidden_states=latents, timestep=timestep, **rest, **texts, return_dict=False)[0]

    embeds, pooled = inputs["encoder_hidden_states"], inputs["pooled_projections"]
    conditions = {
        "cond": Conditioning(embeds, pooled_embeds=pooled),
        "uncond": Conditioning(torch.zeros_like(embeds), pooled_embeds=torch.zeros_like(pooled)),
    }
    guider = AutoGuidance(auto_guidance_layers=("single_transformer_blocks",), guidance_scale=2.0)
    got = guided_prediction(
        guider,
        state=None,
        predict=predict,
        latents=inputs["hidden_states"],
        conditions=conditions,
        step_index=0,
        num_steps=4,
        model=model,
    )
    plain_cond = predict(inputs["hidden_states"], conditions["cond"])
    with guider.perturbation.applied(model):
        weak = predict(inputs["hidden_states"], conditions["uncond"])
    assert torch.allclose(got, weak + 2.0 * (plain_cond - weak), atol=1e-6)


def test_a_failed_perturbed_forward_leaves_the_model_unperturbed() -> None:
    model, inputs = tiny_unet(), unet_inputs()
    hooks, plain = hook_counts(model), forward(model, inputs)
    guider = SkipLayerGuidance(
        skip_layer_guidance_layers=("mid_block.attentions.0.transformer_blocks",), guidance_scale=1.0
    )

    def predict(latents: Tensor, _: Conditioning) -> Tensor:
        if not torch.equal(forward(model, inputs), plain):  # inside the perturbed pass
            raise RuntimeError("out of memory")
        return latents

    with pytest.raises(RuntimeError, match="out of memory"):
        guided_prediction(
            guider,
            state=None,
            predict=predict,
            latents=torch.zeros(1, 4, 8, 8),
            conditions=no_conditions(),
            step_index=2,
            num_steps=20,
            model=model,
        )
    assert torch.equal(forward(model, inputs), plain)
    detach_perturbations(model)
    assert hook_counts(model) == hooks


def test_overhead_per_step_is_small() -> None:
    cfg = ClassifierFreeGuidance()
    latents, conditions = torch.randn(1, 4, 8, 8), GuidanceConditions(toy_conditions(batch=1))

    def predict(x: Tensor, _: Conditioning) -> Tensor:
        return x

    def step() -> Tensor:
        return guided_prediction(
            cfg,
            state=None,
            predict=predict,
            latents=latents,
            conditions=conditions,
            step_index=1,
            num_steps=10,
            model=nn.Identity(),
        )

    for _ in range(20):
        step()
    start = time.perf_counter()
    for _ in range(200):
        step()
    per_step = (time.perf_counter() - start) / 200
    # A cat, a chunk and the CFG arithmetic on tiny tensors; generous for a shared CI machine.
    assert per_step < 1e-3, f"{per_step * 1e6:.0f} µs per step"
    print(f"guided_prediction CFG step: {per_step * 1e6:.1f} µs")


def test_batched_guidance_falls_back_to_sequential_when_out_of_memory() -> None:
    from diffblocks.components.guiders import ClassifierFreeGuidance, GuidanceConditions, guided_prediction

    calls: list[int] = []

    def predict(x: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        calls.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("simulated")
        return x * conditioning.prompt_embeds.mean()

    guider = ClassifierFreeGuidance(guidance_scale=3.0)
    conditions = GuidanceConditions({"cond": Conditioning(torch.ones(1, 1, 2)), "uncond": Conditioning(torch.zeros(1, 1, 2))})
    latents = torch.ones(1, 4)
    for step in range(2):
        out = guided_prediction(guider, state=None, predict=predict, latents=latents, conditions=conditions,
                                step_index=step, num_steps=2, model=torch.nn.Identity())
        assert torch.allclose(out, torch.full((1, 4), 3.0))
    assert calls == [2, 1, 1, 1, 1]  # one failed batched try, then sequential for the rest of the call


def test_the_failed_batched_forward_is_freed_before_the_sequential_retry() -> None:
    # The retry must not run inside the `except` block: its traceback keeps the failed forward's
    # frame, and so its activations, alive.
    failed: list[weakref.ref[Tensor]] = []
    alive_at_retry: list[bool] = []

    def predict(x: Tensor, conditioning: Conditioning) -> Tensor:
        if x.shape[0] > 1:
            activation = x * 2.0  # stands for the activations of the forward that ran out of memory
            failed.extend([weakref.ref(activation), weakref.ref(x)])
            raise torch.OutOfMemoryError("simulated")
        alive_at_retry.append(any(ref() is not None for ref in failed))
        return x * conditioning.prompt_embeds.mean()

    ones, zeros = torch.ones(1, 1, 2), torch.zeros(1, 1, 2)
    conditions = GuidanceConditions({"cond": Conditioning(ones), "uncond": Conditioning(zeros)})
    out = guided_prediction(
        ClassifierFreeGuidance(guidance_scale=3.0),
        state=None,
        predict=predict,
        latents=torch.ones(1, 4),
        conditions=conditions,
        step_index=0,
        num_steps=2,
        model=nn.Identity(),
    )
    assert torch.allclose(out, torch.full((1, 4), 3.0))
    assert len(failed) == 2 and alive_at_retry == [False, False]
    assert conditions.sequential_after_oom and conditions._batched == {}  # the concatenation is freed too


class SlowStack(nn.Module):
    """``x -> block(x) + 1`` that sleeps inside the block (releasing the GIL), so threads interleave."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(4, 4)

    def forward(self, x: Tensor, **_: Tensor) -> Tensor:
        time.sleep(0.001)
        out = self.block(x)
        time.sleep(0.001)
        return out + 1.0


def test_threads_sharing_a_model_neither_collide_nor_see_each_others_perturbation() -> None:
    model = SlowStack().eval()
    x = torch.randn(1, 4)
    with torch.no_grad():
        plain = model(x)
    skipped = x + 1.0  # the block skipped
    guiders = {
        "perturbed": SkipLayerGuidance(
            skip_layer_guidance_layers=["block"], guidance_scale=1.0, skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0
        ),
        "plain": ClassifierFreeGuidance(guidance_scale=2.0),
    }
    conditions = no_conditions()
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(kind: str) -> None:
        guider = guiders[kind]
        try:
            start.wait()
            for step in range(1, 16):
                with torch.no_grad():
                    out = guided_prediction(
                        guider, state=None, predict=lambda latents, _: model(latents), latents=x, conditions=conditions,
                        step_index=step, num_steps=16, model=model,
                    )
                # perturbed: skipped + 2.8 * (plain - skipped); plain CFG of equal predictions: plain
                expected = skipped + 2.8 * (plain - skipped) if kind == "perturbed" else plain
                assert torch.allclose(out, expected, atol=1e-6), f"{kind} step {step} saw another thread's pass"
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(kind,)) for kind in ("perturbed", "perturbed", "plain", "plain")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors[0]
    assert not any(thread.is_alive() for thread in threads)
    with torch.no_grad():
        assert torch.equal(model(x), plain)
    detach_perturbations(model)
    assert hook_counts(model) == [(name, 0) for name, _ in model.named_modules()]


@pytest.mark.parametrize(
    "perturbation",
    [IdentityAttention(("mid_block",)), SkipBlocks(("mid_block.attentions.0.transformer_blocks",)), SmoothedQueries(("mid_block",), blur_sigma=1.0)],
    ids=lambda p: type(p).__name__,
)
def test_a_perturbed_and_a_plain_pass_at_the_same_time_on_one_model(perturbation: AbstractPerturbation) -> None:
    """Two threads inside the same model at once (a barrier at the mid block's entry and exit), one perturbed."""
    model, inputs = tiny_unet(), unet_inputs()
    plain = forward(model, inputs)
    with perturbation.applied(model):
        perturbed = forward(model, inputs)
    assert not torch.equal(perturbed, plain)
    meet = threading.Barrier(2, timeout=20)

    def wait(*_: Any) -> None:
        meet.wait()

    handles = [model.mid_block.register_forward_pre_hook(wait), model.mid_block.register_forward_hook(wait)]
    results: dict[str, list[Tensor]] = {"perturbed": [], "plain": []}
    errors: list[BaseException] = []

    def worker(kind: str) -> None:
        try:
            for _ in range(5):
                if kind == "perturbed":
                    with perturbation.applied(model):
                        results[kind].append(forward(model, inputs))
                else:
                    results[kind].append(forward(model, inputs))
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            meet.abort()
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(kind,)) for kind in results]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        for handle in handles:
            handle.remove()
    assert not errors, errors[0]
    assert all(torch.equal(out, perturbed) for out in results["perturbed"]) and len(results["perturbed"]) == 5
    assert all(torch.equal(out, plain) for out in results["plain"]) and len(results["plain"]) == 5
