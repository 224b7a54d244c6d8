"""Inpainting pieces on their own: mask reading against diffusers', and the two loop blocks."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from diffblocks.blocks.standard import AddMaskChannels, BlendMaskedLatents
from diffblocks.blocks.standard.masks import check_mask_shape, latent_mask, mask_size, mask_to_tensor
from diffblocks.components.schedulers import DDIMScheduler

RNG = np.random.default_rng(0)
VALUES = RNG.random((40, 24)).astype(np.float32)  # height 40, width 24


def layouts() -> dict[str, Any]:
    pil = PIL.Image.fromarray((VALUES * 255).astype("uint8"))
    return {
        "pil-L": pil,
        "pil-RGB": pil.convert("RGB"),
        "pil-list": [pil, pil.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)],
        "np-hw": VALUES,
        "np-hw1": VALUES[..., None],
        "np-bhw": np.stack([VALUES, 1 - VALUES]),
        "np-bhw1": np.stack([VALUES, 1 - VALUES])[..., None],
        "pt-hw": torch.from_numpy(VALUES),
        "pt-bhw": torch.from_numpy(np.stack([VALUES, 1 - VALUES])),
        "pt-b1hw": torch.from_numpy(VALUES)[None, None],
    }


@pytest.mark.parametrize("name", list(layouts()))
@pytest.mark.parametrize("size", [(40, 24), (32, 16)])
def test_masks_read_as_diffusers_reads_them(name: str, size: tuple[int, int]) -> None:
    from diffusers.image_processor import VaeImageProcessor

    mask = layouts()[name]
    reference = VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    expected = reference.preprocess(mask, height=size[0], width=size[1])
    check_mask_shape(mask)
    got = mask_to_tensor(mask, height=size[0], width=size[1])
    assert mask_size(mask) == (40, 24)
    assert got.dtype == torch.float32 and set(got.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(got, expected.float())


@pytest.mark.parametrize("bad", [np.zeros((1, 8, 8, 3)), torch.zeros(1, 3, 8, 8), torch.zeros(8), []])
def test_bad_mask_layouts_are_named(bad: Any) -> None:
    with pytest.raises(ValueError, match="mask"):
        check_mask_shape(bad)


def test_latent_mask_takes_nearest_cells() -> None:
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1.0
    assert torch.equal(latent_mask(mask, factor=8), torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]]))


def fake_unet(in_channels: int) -> Any:
    return SimpleNamespace(params=SimpleNamespace(in_channels=in_channels))


def test_mask_channels_join_the_input_of_inpainting_unets_only() -> None:
    inputs = AddMaskChannels.Inputs(model_input=torch.zeros(2, 4, 8, 8), mask=torch.ones(2, 1, 8, 8), masked_image_latents=torch.full((2, 4, 8, 8), 2.0))
    out = AddMaskChannels().bind({"unet": fake_unet(9)})(inputs).model_input
    assert out.shape == (2, 9, 8, 8) and out[:, 4].eq(1).all() and out[:, 5:].eq(2).all()
    assert AddMaskChannels().bind({"unet": fake_unet(4)})(inputs).model_input is inputs.model_input


def test_blend_keeps_the_image_outside_the_mask_noised_to_the_next_step() -> None:
    scheduler = DDIMScheduler()
    schedule = scheduler.set_timesteps(4, strength=0.75)
    image, noise, latents = torch.ones(1, 4, 4, 4), torch.randn(1, 4, 4, 4), torch.full((1, 4, 4, 4), 5.0)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1.0
    block = BlendMaskedLatents().bind({"scheduler": scheduler, "unet": fake_unet(4)})

    def blend(step_index: int) -> torch.Tensor:
        inputs = BlendMaskedLatents.Inputs(latents=latents, image_latents=image, noise=noise, mask=mask, schedule=schedule, step_index=step_index)
        return block(inputs).latents

    middle, last = blend(0), blend(len(schedule.timesteps) - 1)
    assert middle[..., :2, :].eq(5.0).all() and last[..., :2, :].eq(5.0).all()  # repainted region: the step's latents
    assert torch.equal(middle[..., 2:, :], scheduler.add_noise(schedule, image, noise, 1)[..., 2:, :])
    assert torch.equal(last[..., 2:, :], image[..., 2:, :])  # after the last step: the clean image
    inpainting = BlendMaskedLatents().bind({"scheduler": scheduler, "unet": fake_unet(9)})
    assert torch.equal(inpainting(BlendMaskedLatents.Inputs(latents=latents, image_latents=image, noise=noise, mask=mask, schedule=schedule, step_index=0)).latents, latents)
