"""Every standard block on its own: bound to tiny components, called with typed inputs, checked against
the component calls it stands for; and each block's research method overridden by a subclass."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from torch import Tensor

from diffblocks.blocks import FieldError
from diffblocks.blocks.standard import (
    DecodeImages,
    PrepareImageLatents,
    PrepareInpaintImages,
    PrepareInpaintLatents,
    PrepareLatents,
    PrepareMaskLatents,
    ScaleModelInput,
    SchedulerStep,
    SetImageTimesteps,
    SetInpaintTimesteps,
    SetTimesteps,
)
from diffblocks.blocks.standard.vae import decode_latents, encode_latents
from diffblocks.components.models.autoencoder_kl import AutoencoderKL
from diffblocks.components.noise import Generator
from diffblocks.components.schedulers import DDIMScheduler, EulerDiscreteScheduler, SchedulerState
from tests.guiders.tiny_denoisers import TINY_UNET_CONFIG
from diffblocks.components.models.unet import UNet2DConditionModel

VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": (8, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 16,
}


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(VAE_CONFIG).eval()
    unet = UNet2DConditionModel.from_config(TINY_UNET_CONFIG).eval()
    return {"vae": vae, "unet": unet, "scheduler": EulerDiscreteScheduler()}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def schedule(parts: dict[str, Any], steps: int = 4) -> SchedulerState:
    return parts["scheduler"].set_timesteps(steps, device="cpu")


# --- timesteps --------------------------------------------------------------------------------------------


def test_set_timesteps_is_the_schedulers_schedule(parts: dict[str, Any]) -> None:
    out = SetTimesteps().bind(parts)(SetTimesteps.Inputs(num_inference_steps=5))
    expected = parts["scheduler"].set_timesteps(5, device="cpu")
    assert torch.equal(out.timesteps, expected.timesteps) and torch.equal(out.schedule.timesteps, out.timesteps)


@pytest.mark.parametrize(("block", "default"), [(SetImageTimesteps, 0.8), (SetInpaintTimesteps, 1.0)])
def test_image_timesteps_keep_the_last_strength_part(parts: dict[str, Any], block: Any, default: float) -> None:
    assert block.Inputs(num_inference_steps=10).strength == default
    out = block().bind(parts)(block.Inputs(num_inference_steps=10, strength=0.5))
    full = parts["scheduler"].set_timesteps(10, device="cpu").timesteps
    assert torch.equal(out.timesteps, full[5:])
    with pytest.raises(FieldError, match=r"strength 0.05 runs int\(10 \* 0.05\) = 0 of 10 steps"):
        block().bind(parts).check(block.Inputs(num_inference_steps=10, strength=0.05))


def test_a_subclass_changes_the_schedule(parts: dict[str, Any]) -> None:
    class EveryOtherStep(SetTimesteps):
        def schedule(self, num_inference_steps: int, *, strength: float = 1.0) -> SchedulerState:
            return super().schedule(2 * num_inference_steps, strength=strength)

    out = EveryOtherStep().bind(parts)(SetTimesteps.Inputs(num_inference_steps=3))
    assert len(out.timesteps) == 6


# --- latents ----------------------------------------------------------------------------------------------


def test_prepare_latents_draws_diffusers_noise_at_the_first_sigma(parts: dict[str, Any]) -> None:
    block = PrepareLatents().bind(parts)
    state = schedule(parts)
    out = block(PrepareLatents.Inputs(height=32, width=16, batch_size=2, generator=seeded(), schedule=state))
    noise = torch.randn(2, 4, 16, 8, generator=seeded())  # the VAE factor here is 2
    assert (out.height, out.width) == (32, 16)
    torch.testing.assert_close(out.latents, noise * state.init_noise_sigma, rtol=0, atol=0)
    default = block(PrepareLatents.Inputs(batch_size=1, schedule=state))  # the UNet's native size
    assert (default.height, default.width) == (2 * TINY_UNET_CONFIG["sample_size"],) * 2


def test_prepare_latents_checks_sizes_and_takes_user_latents(parts: dict[str, Any]) -> None:
    block = PrepareLatents().bind(parts)
    with pytest.raises(FieldError, match="height 33 is not a positive multiple of 2"):
        block.check(PrepareLatents.Inputs.model_construct(height=33))
    block.check(PrepareLatents.Inputs.model_construct())  # nothing given: nothing to check
    state = schedule(parts)
    mine = torch.ones(1, 4, 4, 4)
    out = block(PrepareLatents.Inputs(height=8, width=8, batch_size=1, latents=mine, schedule=state))
    assert torch.equal(out.latents, mine * state.init_noise_sigma)
    with pytest.raises(ValueError, match=r"latents have shape \(1, 4, 4, 4\), expected \(1, 4, 8, 8\)"):
        block(PrepareLatents.Inputs(height=16, width=16, batch_size=1, latents=mine, schedule=state))


def test_a_subclass_changes_the_starting_noise(parts: dict[str, Any]) -> None:
    class ZeroNoise(PrepareLatents):
        def noise(
            self, shape: tuple[int, ...], generator: Generator | None, *, device: torch.device, dtype: torch.dtype
        ) -> Tensor:
            return torch.zeros(shape, device=device, dtype=dtype)

    out = ZeroNoise().bind(parts)(PrepareLatents.Inputs(height=8, width=8, batch_size=1, schedule=schedule(parts)))
    assert not out.latents.any()


def test_prepare_image_latents_encodes_and_noises_the_image(parts: dict[str, Any]) -> None:
    image = PIL.Image.fromarray(np.full((12, 10, 3), 200, dtype=np.uint8))
    state = parts["scheduler"].set_timesteps(4, device="cpu", strength=0.5)
    out = PrepareImageLatents().bind(parts)(
        PrepareImageLatents.Inputs(image=image, batch_size=2, generator=seeded(), schedule=state)
    )
    assert (out.height, out.width) == (12, 10) and out.image_latents.shape == (2, 4, 6, 5)
    pixels = torch.full((1, 3, 12, 10), 200 / 255) * 2 - 1
    generator = seeded()
    expected = encode_latents(parts["vae"], pixels, generator)
    torch.testing.assert_close(out.image_latents[0], expected[0])
    noise = torch.randn(2, 4, 6, 5, generator=generator)
    torch.testing.assert_close(out.noise, noise)
    torch.testing.assert_close(out.latents, parts["scheduler"].add_noise(state, out.image_latents, noise, 0))


def test_inpaint_images_and_mask_latents(parts: dict[str, Any]) -> None:
    image = PIL.Image.new("RGB", (8, 6), (255, 0, 0))
    mask = PIL.Image.new("L", (8, 6), 0)
    mask.paste(255, (0, 0, 4, 6))  # the left half is repainted
    block = PrepareInpaintImages().bind(parts)
    with pytest.raises(FieldError, match="mask_image is 6x4 but image is 6x8"):
        block.check(PrepareInpaintImages.Inputs(image=image, mask_image=PIL.Image.new("L", (4, 6))))
    images = block(PrepareInpaintImages.Inputs(image=image, mask_image=mask))
    assert images.pixels.shape == (1, 3, 6, 8) and images.pixels[0, 0].eq(1).all() and images.pixels[0, 1].eq(-1).all()
    assert images.pixel_mask[0, 0, :, :4].eq(1).all() and not images.pixel_mask[0, 0, :, 4:].any()
    masks = PrepareMaskLatents().bind(parts)(
        PrepareMaskLatents.Inputs(pixels=images.pixels, pixel_mask=images.pixel_mask, batch_size=2, generator=seeded())
    )
    assert masks.mask.shape == (2, 1, 3, 4) and masks.masked_image_latents.shape == (2, 4, 3, 4)
    assert masks.mask[:, :, :, :2].eq(1).all() and not masks.mask[:, :, :, 2:].any()


def test_inpaint_latents_start_from_noise_or_the_noised_image(parts: dict[str, Any]) -> None:
    pixels = torch.rand(1, 3, 8, 8, generator=seeded()) * 2 - 1
    block = PrepareInpaintLatents().bind(parts)  # the tiny UNet takes 4 channels: a plain UNet, blended
    full = parts["scheduler"].set_timesteps(4, device="cpu")
    out = block(PrepareInpaintLatents.Inputs(pixels=pixels, batch_size=2, generator=seeded(), schedule=full))
    assert out.image_latents is not None and out.image_latents.shape == (2, 4, 4, 4)  # kept for blending
    torch.testing.assert_close(out.latents, out.noise * full.init_noise_sigma, rtol=0, atol=0)  # strength 1: noise
    half = parts["scheduler"].set_timesteps(4, device="cpu", strength=0.5)
    noised = block(PrepareInpaintLatents.Inputs(pixels=pixels, batch_size=1, generator=seeded(), schedule=half, strength=0.5))
    assert noised.image_latents is not None
    torch.testing.assert_close(noised.latents, parts["scheduler"].add_noise(half, noised.image_latents, noised.noise, 0))
    on_gpu = SimpleNamespace(device=torch.device("cuda"))  # a CUDA generator, as the check sees one
    with pytest.raises(FieldError, match="generator is on 'cuda' but the noise is for 'cpu'"):
        block.check(PrepareInpaintLatents.Inputs.model_construct(generator=on_gpu))


# --- the loop body ----------------------------------------------------------------------------------------


def test_scale_model_input_is_the_schedulers_scaling(parts: dict[str, Any]) -> None:
    state, latents = schedule(parts), torch.randn(1, 4, 4, 4, generator=seeded())
    out = ScaleModelInput().bind(parts)(ScaleModelInput.Inputs(latents=latents, schedule=state, step_index=1))
    sigma = state.sigmas[1]
    torch.testing.assert_close(out.model_input, latents / (sigma**2 + 1) ** 0.5)
    ddim = {"scheduler": DDIMScheduler()}
    plain = ScaleModelInput().bind(ddim)(
        ScaleModelInput.Inputs(latents=latents, schedule=DDIMScheduler().set_timesteps(4, device="cpu"), step_index=1)
    )
    assert torch.equal(plain.model_input, latents)  # DDIM does not rescale


def test_a_subclass_changes_the_model_input(parts: dict[str, Any]) -> None:
    class Doubled(ScaleModelInput):
        def scale(self, latents: Tensor, schedule: SchedulerState, step_index: int) -> Tensor:
            return 2 * super().scale(latents, schedule, step_index)

    state, latents = schedule(parts), torch.randn(1, 4, 4, 4, generator=seeded())
    inputs = ScaleModelInput.Inputs(latents=latents, schedule=state, step_index=0)
    plain = ScaleModelInput().bind(parts)(inputs).model_input
    assert torch.equal(Doubled().bind(parts)(inputs).model_input, 2 * plain)


def test_scheduler_step_is_the_schedulers_step_in_the_latents_dtype(parts: dict[str, Any]) -> None:
    state = schedule(parts)
    latents, noise_pred = torch.randn(1, 4, 4, 4, generator=seeded()), torch.randn(1, 4, 4, 4, generator=seeded(1))
    out = SchedulerStep().bind(parts)(SchedulerStep.Inputs(latents=latents, noise_pred=noise_pred, schedule=state, step_index=0))
    expected = parts["scheduler"].step(schedule(parts), noise_pred, 0, latents)
    torch.testing.assert_close(out.latents, expected, rtol=0, atol=0)
    half = SchedulerStep().bind(parts)(
        SchedulerStep.Inputs(latents=latents.half(), noise_pred=noise_pred, schedule=schedule(parts), step_index=0)
    )
    assert half.latents.dtype == torch.float16


def test_a_subclass_changes_the_update(parts: dict[str, Any]) -> None:
    class Clamped(SchedulerStep):
        def step(
            self, latents: Tensor, noise_pred: Tensor, schedule: SchedulerState, step_index: int, generator: Generator | None
        ) -> Tensor:
            return super().step(latents, noise_pred, schedule, step_index, generator).clamp(-0.5, 0.5)

    inputs = SchedulerStep.Inputs(latents=3 * torch.ones(1, 4, 2, 2), noise_pred=torch.zeros(1, 4, 2, 2), schedule=schedule(parts), step_index=0)
    assert Clamped().bind(parts)(inputs).latents.max() == 0.5


# --- decoding ---------------------------------------------------------------------------------------------


def test_decode_images_in_every_output_type(parts: dict[str, Any]) -> None:
    latents = torch.randn(2, 4, 4, 4, generator=seeded())
    block = DecodeImages().bind(parts)
    assert block(DecodeImages.Inputs(latents=latents, output_type="latent")).images is latents
    pt = block(DecodeImages.Inputs(latents=latents, output_type="pt")).images
    expected = (decode_latents(parts["vae"], latents) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(pt, expected, rtol=0, atol=0)
    array = block(DecodeImages.Inputs(latents=latents, output_type="np")).images
    assert isinstance(array, np.ndarray) and array.shape == (2, 8, 8, 3)
    pil = block(DecodeImages.Inputs(latents=latents)).images
    assert [image.size for image in pil] == [(8, 8), (8, 8)]


def test_a_subclass_changes_the_decoder(parts: dict[str, Any]) -> None:
    class Grey(DecodeImages):
        def decode(self, latents: Tensor) -> Tensor:
            return torch.zeros(latents.shape[0], 3, 2, 2)

    images = Grey().bind(parts)(DecodeImages.Inputs(latents=torch.zeros(1, 4, 4, 4), output_type="pt")).images
    assert torch.equal(images, torch.full((1, 3, 2, 2), 0.5))
