"""Activations in the budget: a decode that would not fit the room weights leave runs sliced or tiled, as diffusers' enable_tiling does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.blocks.standard.vae import decode_latents
from diffblocks.components import ComponentsManager
from diffblocks.components.memory import GroupOffload, MemoryBudgetError, ModelOffload
from diffblocks.components.memory.activations import (
    LIVE_TENSORS,
    MIN_TILE_LATENTS,
    activation_room,
    decode_bytes,
    decode_memory,
    set_activation_room,
)
from diffblocks.presets.tiny.preset import builtin_model_dir
from tests.models.test_vae import SD, TOL, _pair

LATENTS = (2, 4, 10, 9)  # larger than the SD test VAE's 8-latent tile


def test_decode_bytes_counts_the_widest_stage(tmp_path: Path) -> None:
    _, ours = _pair(SD, tmp_path)
    # SD test config: block_out_channels (32, 64) -> the decoder runs 64 channels then 32; 64 channels upsampled to 2x
    assert decode_bytes(ours, LATENTS, itemsize=4) == LIVE_TENSORS * 64 * 20 * 18 * 2 * 4


@pytest.mark.parametrize(
    ("room", "slicing", "tiling"),
    [(None, False, False), (10**9, False, False), ("half", True, False), (0, True, True)],
)
def test_a_decode_is_sliced_then_tiled_as_its_room_shrinks(room: object, slicing: bool, tiling: bool, tmp_path: Path) -> None:
    _, ours = _pair(SD, tmp_path)
    needs = decode_bytes(ours, LATENTS, itemsize=4)
    set_activation_room(ours, needs // 2 if room == "half" else room)  # type: ignore[arg-type]
    choice = decode_memory(ours, LATENTS, itemsize=4)
    assert (choice.slicing, choice.tiling, choice.needs) == (slicing, tiling, needs)


@torch.no_grad()
def test_a_decode_without_room_is_tiled_as_diffusers_enable_tiling_and_the_vae_left_as_it_was(tmp_path: Path) -> None:
    ref, ours = _pair(SD, tmp_path)
    latents = torch.randn(*LATENTS, generator=torch.Generator().manual_seed(5))
    tile = ours.params.tile_sample_size // ours.params.downscale
    set_activation_room(ours, decode_bytes(ours, (1, 4, tile, tile), itemsize=4))  # one default tile fits, the image does not
    assert decode_memory(ours, LATENTS, itemsize=4).tile == ours.params.tile_sample_size
    got = decode_latents(ours, latents)
    ref.enable_tiling()
    ref.enable_slicing()
    expected = ref.decode(ours.denormalize_latents(latents)).sample
    assert (got - expected).abs().max().item() <= TOL
    assert ours.tiling is None and not ours.slicing  # chosen for this decode only
    set_activation_room(ours, None)
    assert not torch.allclose(decode_latents(ours, latents), got)  # with no budget: decoded whole, as set


@torch.no_grad()
def test_tiles_shrink_until_one_fits_the_room(tmp_path: Path) -> None:
    # A 1024² Flux decode under a 12 GiB budget has about 0.6 GiB of room; its VAE's own tile is the whole image.
    ref, ours = _pair(SD, tmp_path)
    latents = torch.randn(*LATENTS, generator=torch.Generator().manual_seed(5))
    default, down = ours.params.tile_sample_size, ours.params.downscale
    half = default // 2 // down
    set_activation_room(ours, decode_bytes(ours, (1, 4, half, half), itemsize=4))
    choice = decode_memory(ours, LATENTS, itemsize=4)
    assert (choice.tiling, choice.tile) == (True, default // 2)
    set_activation_room(ours, 0)  # nothing fits: the smallest tile, and an out-of-memory error has the relief ladder
    assert decode_memory(ours, LATENTS, itemsize=4).tile == MIN_TILE_LATENTS * down
    set_activation_room(ours, decode_bytes(ours, (1, 4, half, half), itemsize=4))
    got = decode_latents(ours, latents)
    ref.enable_tiling()
    ref.enable_slicing()
    ref.tile_sample_min_size, ref.tile_latent_min_size = default // 2, half
    expected = ref.decode(ours.denormalize_latents(latents)).sample
    assert (got - expected).abs().max().item() <= TOL


def test_the_budget_reserves_activations_and_leaves_the_room_to_the_vae() -> None:
    manager = ComponentsManager(device="cpu", memory_budget="100MiB", activations="20MiB")
    pipe = Pipeline.from_pretrained(builtin_model_dir(), manager=manager)
    plan = manager.plan()
    assert plan.policy == GroupOffload(1)  # ModelOffload's 86.6 MiB fit 100 MiB, but not the 80 MiB left to weights
    pipe(prompt="a cross", num_inference_steps=1, progress=False)
    vae = pipe.components["vae"]
    assert activation_room(vae) == plan.budget - plan.peak >= 20 * 2**20  # type: ignore[operator]
    plain = ComponentsManager(device="cpu", memory_budget="100MiB", activations="5MiB")
    pipe = Pipeline.from_pretrained(builtin_model_dir(), manager=plain)
    plan = plain.plan()
    assert plan.policy == ModelOffload()
    pipe(prompt="a cross", num_inference_steps=1, progress=False)
    # one model at a time: the VAE decodes alone, with all but its own weights as room, not what the largest leaves
    vae, unet = pipe.components["vae"], pipe.components["unet"]
    assert activation_room(vae) == plan.budget - plan.sizes["vae"].total > plan.budget - plan.peak
    assert activation_room(unet) == plan.budget - plan.sizes["unet"].total


def test_a_reserve_too_large_for_the_budget_says_so() -> None:
    manager = ComponentsManager(device="cpu", memory_budget="60MiB", activations="20MiB")
    Pipeline.from_pretrained(builtin_model_dir(), manager=manager)
    with pytest.raises(MemoryBudgetError, match=r"LeafOffload\(\) needs at least 64.7 MiB .* plus the 20.0 MiB reserved for activations"):
        manager.plan()
    with pytest.raises(ValueError, match=r"activations='2GiB' reserves part of a memory budget: give memory_budget= too"):
        ComponentsManager(device="cpu", activations="2GiB")


def test_images_under_a_budget_with_room_for_the_decode_are_unchanged() -> None:
    inputs = dict(prompt="a small green cross in the center", num_inference_steps=2, progress=False)
    plain = Pipeline.from_pretrained(builtin_model_dir())(**inputs, generator=torch.Generator().manual_seed(0)).images[0]
    manager = ComponentsManager(device="cpu", memory_budget="100MiB", activations="20MiB")
    image = Pipeline.from_pretrained(builtin_model_dir(), manager=manager)(**inputs, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(plain))
