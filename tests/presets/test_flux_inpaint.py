"""Flux.1 inpainting against diffusers' FluxInpaintPipeline on tiny random weights: same seed, same image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from diffblocks.blocks import InputError, Pipeline
from diffblocks.blocks.flux import BlendFluxMaskedLatents, FluxSetImageTimesteps, PrepareFluxMaskLatents
from diffblocks.components.models.flux import pack_latents
from diffblocks.presets import family_of
from tests.presets.flux_fixtures import tiny_flux

TOLERANCE = 1e-5  # float32 rounding, as for img2img (tests/presets/test_flux.py)


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux_inpaint")
    return {name: tiny_flux(root / name, guidance_embeds=name == "dev") for name in ("dev", "schnell")}


@pytest.fixture(scope="module")
def ours(repos: dict[str, Path]) -> dict[str, Pipeline]:
    return {name: Pipeline.from_pretrained(str(repo)) for name, repo in repos.items()}


@pytest.fixture(scope="module")
def references(repos: dict[str, Path]) -> dict[str, Any]:
    import diffusers

    found = {name: diffusers.FluxInpaintPipeline.from_pretrained(repo) for name, repo in repos.items()}
    for pipe in found.values():
        pipe.set_progress_bar_config(disable=True)
    return found


def picture(height: int = 32, width: int = 48) -> PIL.Image.Image:
    return PIL.Image.fromarray((np.random.default_rng(1).random((height, width, 3)) * 255).astype("uint8"))


def mask(height: int = 32, width: int = 48) -> PIL.Image.Image:
    array = np.zeros((height, width), dtype=np.uint8)
    array[4:20, 10:30] = 255
    return PIL.Image.fromarray(array)


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(7)


def max_diff(ours: Any, expected: Any) -> float:
    return float(np.abs(np.asarray(ours) - np.asarray(expected)).max())


def test_the_inpaint_class_name_picks_the_flux_preset() -> None:
    assert family_of("FluxInpaintPipeline", {}).name == "flux"
    assert family_of("FluxControlNetInpaintPipeline", {}).name == "flux_controlnet"


@pytest.mark.parametrize(("variant", "strength"), [("dev", 0.6), ("dev", 1.0), ("schnell", 0.8)])
def test_inpaint_matches_diffusers(variant: str, strength: float, ours: dict[str, Pipeline], references: dict[str, Any]) -> None:
    kwargs = dict(prompt="a red circle", image=picture(), mask_image=mask(), height=32, width=48, strength=strength,
                  num_inference_steps=4, guidance_scale=3.5, max_sequence_length=16)  # fmt: skip
    expected = references[variant](**kwargs, generator=seeded(), output_type="np").images
    out = ours[variant](**kwargs, generator=seeded(), output_type="np", progress=False)
    assert out.workflow == "inpaint"
    assert len(out.timesteps) == 4 - int(4 - 4 * strength)
    assert out.images.shape == expected.shape == (1, 32, 48, 3)
    assert max_diff(out.images, expected) < TOLERANCE  # measured: 1.2e-6 to 2.2e-6


def test_batches_and_generator_lists_match_diffusers(ours: dict[str, Pipeline], references: dict[str, Any]) -> None:
    kwargs = dict(prompt="a red circle", image=picture(), mask_image=mask(), height=32, width=48, strength=0.9,
                  num_inference_steps=2, guidance_scale=3.5, max_sequence_length=16, num_images_per_prompt=2)  # fmt: skip
    generators = lambda: [seeded(), torch.Generator().manual_seed(8)]  # noqa: E731
    expected = references["dev"](**kwargs, generator=generators(), output_type="np").images
    out = ours["dev"](**kwargs, generator=generators(), output_type="np", progress=False)
    assert max_diff(out.images, expected) < TOLERANCE


def test_the_mask_is_packed_like_the_latents_and_the_blend_keeps_the_image_outside_it(ours: dict[str, Pipeline]) -> None:
    components = ours["dev"].components
    pixel_mask = torch.zeros(1, 1, 32, 48)
    pixel_mask[..., :, 24:] = 1.0  # repaint the right half: latent columns 3..5
    mask = PrepareFluxMaskLatents().bind(components)(PrepareFluxMaskLatents.Inputs(pixel_mask=pixel_mask, batch_size=2)).mask
    expected = torch.zeros(2, 16, 4, 6)
    expected[..., 3:] = 1.0
    assert torch.equal(mask, pack_latents(expected))  # (2, 6 tokens, 64): each token's 2x2 cells of every channel

    schedule = FluxSetImageTimesteps().bind(components)(
        FluxSetImageTimesteps.Inputs(num_inference_steps=3, height=32, width=48, strength=1.0)
    ).schedule
    image, noise, latents = (torch.randn(2, 16, 4, 6, generator=seeded()) for _ in range(3))
    blend = BlendFluxMaskedLatents().bind(components)
    inputs = dict(latents=pack_latents(latents), image_latents=image, noise=noise, mask=mask, schedule=schedule)
    last = blend(blend.Inputs(**inputs, step_index=2)).latents
    assert torch.equal(last, pack_latents(torch.where(expected.bool(), latents, image)))  # the last step keeps it clean
    first = blend(blend.Inputs(**inputs, step_index=0)).latents
    sigma = schedule.full_sigmas[schedule.position(1)]
    noised = sigma * noise + (1 - sigma) * image  # the image at the next step's level
    assert torch.allclose(first, pack_latents(torch.where(expected.bool(), latents, noised)), atol=1e-6)


# --- bad input, each before any work -------------------------------------------------------------------------


def input_error(pipe: Pipeline, **kwargs: Any) -> str:
    with pytest.raises(InputError) as caught:
        pipe(**{"prompt": "a cat", "progress": False, **kwargs})
    return str(caught.value)


def test_a_mask_of_another_size_is_refused(ours: dict[str, Pipeline]) -> None:
    message = input_error(ours["dev"], image=picture(), mask_image=mask(32, 32))
    assert "[start.inpaint.preprocess_flux_inpaint_images] mask_image: mask_image is 32x32 but image is 32x48" in message


def test_strength_out_of_range_is_refused(ours: dict[str, Pipeline]) -> None:
    for strength in (0.0, 1.5):
        message = input_error(ours["dev"], image=picture(), mask_image=mask(), strength=strength)
        assert "[start.inpaint.flux_set_image_timesteps] strength" in message


def test_a_mask_without_an_image_and_bad_masks_are_refused(ours: dict[str, Pipeline]) -> None:
    assert "image" in input_error(ours["dev"], mask_image=mask())
    message = input_error(ours["dev"], image=picture(), mask_image=torch.zeros(1, 3, 32, 48))
    assert "mask_image has shape (1, 3, 32, 48)" in message
    assert "width 40 is not a positive multiple of 16" in input_error(ours["dev"], image=picture(), mask_image=mask(), width=40)
