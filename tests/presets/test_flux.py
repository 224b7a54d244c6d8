"""Flux.1 preset (dev and schnell) against diffusers on tiny random weights: same seed, same image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from diffblocks.blocks import InputError, Pipeline
from diffblocks.blocks.flux import (
    FluxDefaults,
    FluxEncodePrompt,
    FluxSetImageTimesteps,
    FluxSetTimesteps,
    PrepareFluxConditions,
    PrepareFluxGuidance,
    PrepareFluxLatents,
    UnpackLatents,
)
from diffblocks.components.denoisers import Conditioning
from diffblocks.components.models.flux import pack_latents, prepare_image_ids
from diffblocks.presets import family_of
from tests.presets.flux_fixtures import tiny_flux

# float32 rounding: plain text2img matches bit for bit; elsewhere kernels differ in summation order
# (a batched CFG forward, longer prompts, and img2img, where diffusers hands the VAE a
# channels-last-strided image tensor), by at most 2e-6 in the images measured
TOLERANCE = 1e-5
VARIANTS = ("dev", "schnell")


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux")
    return {name: tiny_flux(root / name, guidance_embeds=name == "dev") for name in VARIANTS}


@pytest.fixture(scope="module")
def ours(repos: dict[str, Path]) -> dict[str, Pipeline]:
    return {name: Pipeline.from_pretrained(str(repo)) for name, repo in repos.items()}


@pytest.fixture(scope="module")
def references(repos: dict[str, Path]) -> dict[str, Any]:
    import diffusers

    found: dict[str, Any] = {}
    for name, repo in repos.items():
        text2img = diffusers.FluxPipeline.from_pretrained(repo)
        img2img = diffusers.FluxImg2ImgPipeline(**text2img.components)
        for pipe in (text2img, img2img):
            pipe.set_progress_bar_config(disable=True)
        found[name], found[f"{name}-img2img"] = text2img, img2img
    return found


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(7)


def max_diff(ours: Any, expected: Any) -> float:
    return float(np.abs(np.asarray(ours) - np.asarray(expected)).max())


def test_index_class_names_pick_the_flux_preset(ours: dict[str, Pipeline]) -> None:
    assert family_of("FluxPipeline", {}).name == family_of("FluxImg2ImgPipeline", {}).name == "flux"
    assert ours["dev"].workflows == ("inpaint", "img2img", "text2img")  # inpaint: tests/presets/test_flux_inpaint.py


@pytest.mark.parametrize("variant", VARIANTS)
def test_text2img_matches_diffusers(variant: str, ours: dict[str, Pipeline], references: dict[str, Any]) -> None:
    kwargs = dict(
        prompt=["a red circle", "a blue square"], height=64, width=48, num_inference_steps=3, guidance_scale=4.0,
        max_sequence_length=16, num_images_per_prompt=2,
    )
    expected = references[variant](**kwargs, generator=seeded(), output_type="np").images
    out = ours[variant](**kwargs, generator=seeded(), output_type="np", progress=False)
    assert out.workflow == "text2img"
    assert out.images.shape == expected.shape == (4, 64, 48, 3)
    assert max_diff(out.images, expected) < TOLERANCE  # measured: 0.0


@pytest.mark.parametrize("batched", [True, False])
def test_true_cfg_and_second_prompts_match_diffusers(batched: bool, ours: dict[str, Pipeline], references: dict[str, Any]) -> None:
    kwargs = dict(
        prompt=["a red circle", "a blue square"], prompt_2=["round and red", "square and blue"],
        negative_prompt=["blurry", ""], negative_prompt_2=["dark", "noisy"], true_cfg_scale=3.0,
        height=32, width=32, num_inference_steps=2, max_sequence_length=16,
    )
    expected = references["dev"](**kwargs, generator=seeded(), output_type="np").images
    out = ours["dev"](**kwargs, guidance_batched=batched, generator=seeded(), output_type="np", progress=False)
    assert max_diff(out.images, expected) < TOLERANCE  # measured: 1.3e-6 batched, 0.0 sequential


@pytest.mark.parametrize("variant", VARIANTS)
def test_img2img_matches_diffusers(variant: str, ours: dict[str, Pipeline], references: dict[str, Any]) -> None:
    image = PIL.Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype("uint8"))
    kwargs = dict(
        prompt="a red circle", image=image, strength=0.7, num_inference_steps=4, guidance_scale=3.5,
        max_sequence_length=16, num_images_per_prompt=2,
    )
    # our img2img keeps the image's size by default; diffusers' resizes to 1024 unless told
    expected = references[f"{variant}-img2img"](**kwargs, height=48, width=64, generator=seeded(), output_type="np").images
    out = ours[variant](**kwargs, generator=seeded(), output_type="np", progress=False)
    assert out.workflow == "img2img"
    assert out.images.shape == expected.shape == (2, 48, 64, 3)
    assert max_diff(out.images, expected) < TOLERANCE  # measured: 1.4e-6 (dev), 2.0e-6 (schnell)

    resized = dict(kwargs, height=32, width=32, negative_prompt="grey", true_cfg_scale=2.0)
    expected = references[f"{variant}-img2img"](**resized, generator=seeded(), output_type="np").images
    out = ours[variant](**resized, generator=seeded(), output_type="np", progress=False)
    assert out.images.shape == (2, 32, 32, 3)
    assert max_diff(out.images, expected) < TOLERANCE  # measured: 1.5e-6 (dev), 1.3e-6 (schnell)


def test_schnell_defaults_match_diffusers_called_as_the_model_card_says(
    ours: dict[str, Pipeline], references: dict[str, Any]
) -> None:
    kwargs = dict(prompt="a cat", height=32, width=32)
    expected = references["schnell"](**kwargs, num_inference_steps=4, max_sequence_length=256, guidance_scale=0.0, generator=seeded(), output_type="np").images
    out = ours["schnell"](**kwargs, generator=seeded(), output_type="np", progress=False)
    assert len(out.timesteps) == 4
    assert out.conditioning.prompt_embeds.shape[1] == 256
    assert max_diff(out.images, expected) < TOLERANCE  # measured: 1.0e-6


def test_generator_lists_match_diffusers(ours: dict[str, Pipeline], references: dict[str, Any]) -> None:
    image = PIL.Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype("uint8"))
    kwargs = dict(prompt="a red circle", image=image, height=32, width=32, strength=0.9, num_inference_steps=2,
                  guidance_scale=3.5, max_sequence_length=16, num_images_per_prompt=2)
    expected = references["dev-img2img"](**kwargs, generator=[seeded(), torch.Generator().manual_seed(8)], output_type="np").images
    out = ours["dev"](**kwargs, generator=[seeded(), torch.Generator().manual_seed(8)], output_type="np", progress=False)
    assert max_diff(out.images, expected) < TOLERANCE


def test_given_latents_and_latent_output_match_diffusers(ours: dict[str, Pipeline], references: dict[str, Any]) -> None:
    latents = torch.randn(1, 4 * 3, 64, generator=seeded())  # packed: a 4 x 3 token grid (64 x 48 pixels)
    kwargs = dict(prompt="a dog", latents=latents, height=64, width=48, num_inference_steps=2, max_sequence_length=16)
    expected = references["dev"](**kwargs, output_type="latent").images
    out = ours["dev"](**kwargs, output_type="latent", progress=False)
    assert out.images.shape == (1, 16, 8, 6)  # unpacked VAE latents, where diffusers returns the tokens
    assert max_diff(pack_latents(out.images), expected) < TOLERANCE


@pytest.mark.parametrize(("height", "width", "steps", "strength"), [(64, 48, 3, 1.0), (1024, 1024, 28, 1.0), (512, 768, 28, 0.6)])
def test_schedule_and_mu_match_diffusers(
    repos: dict[str, Path], ours: dict[str, Pipeline], height: int, width: int, steps: int, strength: float
) -> None:
    import diffusers
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    reference = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(repos["dev"], subfolder="scheduler")
    config = reference.config
    seq_len = (height // 16) * (width // 16)
    mu = calculate_shift(seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    begin = int(max(steps - steps * strength, 0))  # FluxImg2ImgPipeline.get_timesteps

    block = FluxSetImageTimesteps() if strength < 1 else FluxSetTimesteps()
    block.bind(ours["dev"].components)
    inputs = dict(num_inference_steps=steps, height=height, width=width)
    out = block(block.Inputs(**inputs, strength=strength) if strength < 1 else block.Inputs(**inputs))
    assert out.mu == pytest.approx(mu, rel=1e-12)
    assert torch.equal(out.timesteps, reference.timesteps[begin:])
    assert torch.equal(torch.tensor(out.schedule.full_sigmas, dtype=torch.float32), reference.sigmas)


def test_defaults_follow_the_transformer(ours: dict[str, Pipeline]) -> None:
    for variant, (steps, length) in {"dev": (28, 512), "schnell": (4, 256)}.items():
        block = FluxDefaults().bind(ours[variant].components)
        resolved = block(FluxDefaults.Inputs())
        assert (resolved.num_inference_steps, resolved.max_sequence_length) == (steps, length)
        assert block(FluxDefaults.Inputs(sigmas=[1.0, 0.5])).num_inference_steps == 2
    assert ours["dev"].input_schema()["properties"]["guidance_scale"]["default"] == 3.5


def input_error(pipe: Pipeline, **kwargs: Any) -> str:
    with pytest.raises(InputError) as caught:
        pipe(**{"prompt": "a cat", "progress": False, **kwargs})
    return str(caught.value)


def test_sizes_that_do_not_tile_into_tokens_are_rejected(ours: dict[str, Pipeline]) -> None:
    message = input_error(ours["dev"], height=40, width=48)
    assert "[start.text2img.prepare_flux_latents] height: height 40 is not a positive multiple of 16" in message
    assert "use 32 or 48" in message
    image = PIL.Image.new("RGB", (48, 48))
    message = input_error(ours["dev"], image=image, width=50)
    assert "[start.img2img.preprocess_flux_image] width: width 50 is not a positive multiple of 16" in message


def test_prompt_lists_must_pair_with_the_prompts(ours: dict[str, Pipeline]) -> None:
    message = input_error(ours["dev"], prompt=["a", "b"], prompt_2=["x", "y", "z"])
    assert "prompt_2 has 3 entries but prompt has 2" in message
    message = input_error(ours["dev"], prompt=["a", "b", "c"], negative_prompt=["x", "y"], true_cfg_scale=2.0)
    assert "negative_prompt has 2 entries but prompt has 3" in message
    assert "empty list" in input_error(ours["dev"], prompt=[])


def test_strength_out_of_range_is_rejected(ours: dict[str, Pipeline]) -> None:
    image = PIL.Image.new("RGB", (32, 32))
    for strength in (0.0, 1.5):
        message = input_error(ours["dev"], image=image, strength=strength)
        assert "[start.img2img.flux_set_image_timesteps] strength" in message


def test_other_bad_inputs_are_rejected(ours: dict[str, Pipeline]) -> None:
    message = input_error(ours["dev"], true_cfg_scale=4.0)
    assert "negative_prompt: true_cfg_scale 4.0 makes an unconditional prediction" in message
    assert "max_sequence_length" in input_error(ours["dev"], max_sequence_length=600)
    assert "2 sigmas for num_inference_steps 3" in input_error(ours["dev"], sigmas=[1.0, 0.5], num_inference_steps=3)
    with pytest.raises(ValueError, match=r"latents have shape \(1, 5, 64\), expected packed \(1, 4, 64\)"):
        ours["dev"](prompt="a cat", height=32, width=32, latents=torch.zeros(1, 5, 64), progress=False)


def test_too_few_generators_are_rejected(ours: dict[str, Pipeline]) -> None:
    message = input_error(ours["dev"], prompt=["a", "b"], num_images_per_prompt=2, generator=[seeded()] * 3)
    assert "generator: 3 generators for 4 images (2 prompts x num_images_per_prompt 2)" in message


def test_image_counts_sizes_and_image_values_are_checked_before_the_encoders(ours: dict[str, Pipeline]) -> None:
    image = PIL.Image.new("RGB", (32, 32))
    message = input_error(ours["dev"], prompt=["a", "b"], image=[image] * 3)
    assert "image: 3 images for 2 images (2 prompts x num_images_per_prompt 1)" in message
    assert "height: height 100000 is larger than 16384 pixels" in input_error(ours["dev"], height=100_000, width=32)
    message = input_error(ours["dev"], image=torch.full((1, 3, 32, 32), 255.0))
    assert "image: image is a float tensor with values in [255, 255]" in message
    assert "Input should be a finite number" in input_error(ours["dev"], guidance_scale=float("inf"))


# --- blocks on their own ------------------------------------------------------------------------------------


def test_encode_prompt_shapes_and_pairing(ours: dict[str, Pipeline]) -> None:
    block = FluxEncodePrompt().bind(ours["dev"].components)
    out = block(FluxEncodePrompt.Inputs(prompt=["a", "b"], negative_prompt="c", num_images_per_prompt=3, max_sequence_length=8))
    cond, negative = out.conditioning, out.negative_conditioning
    assert out.batch_size == 6
    pooled = cond.pooled_embeds
    assert pooled is not None and cond.prompt_embeds.shape == (6, 8, 32) and pooled.shape == (6, 32)
    assert torch.equal(pooled[0], pooled[2])  # a, a, a, b, b, b
    assert not torch.equal(pooled[2], pooled[3])
    assert negative is not None and torch.equal(negative.prompt_embeds[0], negative.prompt_embeds[5])
    alone = block(FluxEncodePrompt.Inputs(prompt="a", max_sequence_length=8))
    assert alone.negative_conditioning is None
    assert torch.allclose(alone.conditioning.prompt_embeds[0], cond.prompt_embeds[0], atol=1e-6)


def test_latents_are_packed_with_their_ids_and_unpack_back(ours: dict[str, Pipeline]) -> None:
    components = ours["dev"].components
    made = PrepareFluxLatents().bind(components)(PrepareFluxLatents.Inputs(height=64, width=48, batch_size=2, generator=seeded()))
    assert made.latents.shape == (2, 4 * 3, 64) and (made.height, made.width) == (64, 48)
    assert torch.equal(made.image_ids, prepare_image_ids(4, 3))
    unpacked = UnpackLatents().bind(components)(UnpackLatents.Inputs(latents=made.latents, height=64, width=48)).latents
    assert torch.equal(unpacked, torch.randn(2, 16, 8, 6, generator=seeded()))  # the noise, as drawn


def test_guidance_set_up_per_variant(ours: dict[str, Pipeline]) -> None:
    conditioning = Conditioning(torch.zeros(1, 8, 32), pooled_embeds=torch.zeros(1, 32))
    inputs = PrepareFluxGuidance.Inputs(guidance_scale=5.0, num_inference_steps=4)
    dev = PrepareFluxGuidance().bind(ours["dev"].components)(inputs)
    made = PrepareFluxConditions().bind(ours["dev"].components)(
        PrepareFluxConditions.Inputs(
            conditioning=conditioning,
            negative_conditioning=None,
            image_ids=prepare_image_ids(4, 3),
            embedded_guidance=dev.embedded_guidance,
            call_guider=dev.call_guider,
        )
    ).guidance.conditions
    embedded, text_ids = made["cond"].embedded_guidance, made["cond"].text_ids
    assert embedded is not None and embedded.tolist() == [5.0]
    assert list(made) == ["cond"] and text_ids is not None and text_ids.shape == (8, 3)
    assert PrepareFluxGuidance().bind(ours["schnell"].components)(inputs).embedded_guidance is None


def test_text2img_in_bfloat16_matches_diffusers(repos: dict[str, Path]) -> None:
    """bf16 rounds every step: the scheduler must do diffusers' arithmetic, not just the same maths."""
    import diffusers

    reference = diffusers.FluxPipeline.from_pretrained(repos["dev"], torch_dtype=torch.bfloat16)
    reference.set_progress_bar_config(disable=True)
    pipe = Pipeline.from_pretrained(str(repos["dev"]), dtype=torch.bfloat16)
    kwargs = dict(
        prompt=["a red circle", "a blue square"], height=64, width=48, num_inference_steps=4, max_sequence_length=16
    )
    expected = reference(**kwargs, generator=seeded(), output_type="np").images
    out = pipe(**kwargs, generator=seeded(), output_type="np", progress=False)
    assert max_diff(out.images, expected) == 0.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_pipelines_load_back_and_in_diffusers(variant: str, repos: dict[str, Path], tmp_path: Path) -> None:
    """A changed scheduler travels with the saved pipeline; ours and diffusers read the folder alike."""
    import diffusers

    pipe = Pipeline.from_pretrained(str(repos[variant]))
    pipe.update_components(scheduler=pipe.components["scheduler"].replace(shift_terminal=0.05))
    folder = pipe.save_pretrained(tmp_path / "saved")
    back = Pipeline.from_pretrained(str(folder))
    assert back.preset.family == "flux" and back.components["scheduler"].shift_terminal == 0.05

    kwargs = dict(prompt="a red circle", height=32, width=32, num_inference_steps=3, max_sequence_length=16)
    image = pipe(**kwargs, generator=seeded(), output_type="np", progress=False).images
    assert max_diff(back(**kwargs, generator=seeded(), output_type="np", progress=False).images, image) == 0.0
    reference = diffusers.FluxPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    assert reference.scheduler.config.shift_terminal == 0.05
    assert max_diff(reference(**kwargs, generator=seeded(), output_type="np").images, image) < TOLERANCE
