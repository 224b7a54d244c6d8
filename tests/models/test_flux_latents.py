"""Flux.1 packed-latent layout and position ids: parity with diffusers' FluxPipeline helpers."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

from diffblocks.components.models.flux import (
    latent_grid,
    pack_latents,
    prepare_image_ids,
    prepare_text_ids,
    unpack_latents,
)


@pytest.mark.parametrize(("height", "width"), [(64, 96), (70, 130), (16, 16)])
def test_pack_unpack_match_pipeline(height: int, width: int) -> None:
    grid_h, grid_w = latent_grid(height, width)
    latents = torch.randn(2, 4, 2 * grid_h, 2 * grid_w)

    packed = pack_latents(latents)
    expected = FluxPipeline._pack_latents(latents, 2, 4, 2 * grid_h, 2 * grid_w)  # pyright: ignore[reportPrivateUsage]
    assert packed.shape == (2, grid_h * grid_w, 16)
    assert torch.equal(packed, expected)

    unpacked = unpack_latents(packed, height, width, vae_scale_factor=8)
    assert torch.equal(unpacked, FluxPipeline._unpack_latents(packed, height, width, 8))  # pyright: ignore[reportPrivateUsage]
    assert torch.equal(unpacked, latents)


def test_pack_and_unpack_reject_mismatched_sizes() -> None:
    with pytest.raises(ValueError, match="must be even .* got 5x6"):
        pack_latents(torch.zeros(1, 4, 5, 6))
    with pytest.raises(ValueError, match=r"6 tokens do not tile a 64x64 image: expected 4x4 = 16"):
        unpack_latents(torch.zeros(1, 6, 16), 64, 64, vae_scale_factor=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_image_ids_match_pipeline(dtype: torch.dtype) -> None:
    # 40 x 300 reaches positions beyond bfloat16's exact integers (256).
    ids = prepare_image_ids(40, 300, device="cpu", dtype=dtype)
    expected = FluxPipeline._prepare_latent_image_ids(1, 40, 300, torch.device("cpu"), dtype)  # pyright: ignore[reportPrivateUsage]
    assert ids.dtype == dtype and ids.shape == (40 * 300, 3)
    assert torch.equal(ids, expected)


def test_text_ids_are_zero() -> None:
    ids = prepare_text_ids(7, dtype=torch.bfloat16)
    assert ids.dtype == torch.bfloat16 and torch.equal(ids, torch.zeros(7, 3, dtype=torch.bfloat16))
