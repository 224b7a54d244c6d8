"""AutoencoderKL: parity with diffusers for encode, sampling, decode, tiling and slicing; Flux-style latents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL as RefVAE

from diffblocks.components.models.autoencoder_kl import AutoencoderKL, AutoencoderKLParams, VaeTiling

SD: dict[str, Any] = {
    "block_out_channels": (32, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 1,
    "latent_channels": 4,
    "sample_size": 16,
}
# Flux's autoencoder: 16 latent channels, no quant convs, a shift before the scale.
FLUX: dict[str, Any] = {
    **SD,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
}
TOL = 1e-5  # float32 rounding; the measured difference is 0 throughout


def _pair(config: dict[str, Any], tmp_path: Path) -> tuple[RefVAE, AutoencoderKL]:
    torch.manual_seed(0)
    ref = RefVAE(**config).eval()
    ref.save_pretrained(tmp_path / "vae")
    return ref, AutoencoderKL.from_pretrained(tmp_path / "vae")


def _report(what: str, got: torch.Tensor, expected: torch.Tensor) -> float:
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    print(f"{what} max abs diff: {diff:.3g}")
    return diff


@pytest.mark.parametrize(("name", "config"), [("sd", SD), ("flux16", FLUX)])
@torch.no_grad()
def test_encode_sample_decode_parity(name: str, config: dict[str, Any], tmp_path: Path) -> None:
    ref, ours = _pair(config, tmp_path)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = ref.encode(images).latent_dist
    posterior = ours.encode(images)
    assert _report(f"{name} encode mean", posterior.mean, expected.mean) <= TOL
    assert _report(f"{name} encode std", posterior.std, expected.std) <= TOL
    assert torch.equal(posterior.mode(), posterior.mean)
    sample = posterior.sample(torch.Generator().manual_seed(3))
    assert _report(f"{name} posterior sample", sample, expected.sample(torch.Generator().manual_seed(3))) <= TOL
    assert _report(f"{name} decode", ours.decode(sample), ref.decode(sample).sample) <= TOL
    reconstruction = ref(images, sample_posterior=True, generator=torch.Generator().manual_seed(4)).sample
    got = ours(images, sample_posterior=True, generator=torch.Generator().manual_seed(4))
    assert _report(f"{name} forward", got, reconstruction) <= TOL


@torch.no_grad()
def test_tiled_and_sliced_match_diffusers(tmp_path: Path) -> None:
    ref, ours = _pair(SD, tmp_path)
    ref.enable_tiling()
    ref.enable_slicing()
    ours.tiling = VaeTiling()
    ours.slicing = True
    latents = torch.randn(2, 4, 10, 9, generator=torch.Generator().manual_seed(5))  # > the 8-latent tile
    images = torch.randn(2, 3, 20, 18, generator=torch.Generator().manual_seed(6))  # > the 16-pixel tile
    assert _report("tiled+sliced decode", ours.decode(latents), ref.decode(latents).sample) <= TOL
    assert _report("tiled+sliced encode", ours.encode(images).mean, ref.encode(images).latent_dist.mean) <= TOL
    ref.disable_slicing()
    ours.slicing = False
    tiled = ours.decode(latents)
    assert _report("tiled decode", tiled, ref.decode(latents).sample) <= TOL
    ours.tiling = None
    assert not torch.allclose(ours.decode(latents), tiled)  # tiling really changed the computation
    ref.disable_tiling()
    ref.enable_slicing()
    ours.slicing = True
    assert _report("sliced decode", ours.decode(latents), ref.decode(latents).sample) <= TOL


@torch.no_grad()
def test_custom_tile_size_and_overlap(tmp_path: Path) -> None:
    ref, ours = _pair(SD, tmp_path)
    ref.enable_tiling()
    ref.tile_sample_min_size, ref.tile_latent_min_size, ref.tile_overlap_factor = 8, 4, 0.5
    ours.tiling = VaeTiling(tile_sample_size=8, overlap=0.5)
    latents = torch.randn(1, 4, 9, 7, generator=torch.Generator().manual_seed(7))
    assert _report("custom tiles decode", ours.decode(latents), ref.decode(latents).sample) <= TOL


def test_latent_normalisation() -> None:
    flux = AutoencoderKL.from_config(FLUX)
    z = torch.randn(1, 16, 2, 2)
    assert flux.shift_factor == 0.1159 and flux.scaling_factor == 0.3611
    torch.testing.assert_close(flux.normalize_latents(z), (z - 0.1159) * 0.3611)
    torch.testing.assert_close(flux.denormalize_latents(flux.normalize_latents(z)), z)
    stats = {"latents_mean": (0.5,) * 4, "latents_std": (2.0,) * 4}
    sdxl_like = AutoencoderKL.from_config({**SD, "scaling_factor": 0.13025, **stats})
    z4 = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(sdxl_like.denormalize_latents(z4), z4 * 2.0 / 0.13025 + 0.5)
    torch.testing.assert_close(sdxl_like.normalize_latents(sdxl_like.denormalize_latents(z4)), z4)
    assert AutoencoderKL.from_config(SD).force_upcast


def test_params_errors_and_config_round_trip() -> None:
    with pytest.raises(ValueError, match="latents_mean has 3 entries but latent_channels is 4"):
        AutoencoderKLParams(**{**SD, "latents_mean": (0.0,) * 3, "latents_std": (1.0,) * 3})
    with pytest.raises(ValueError, match="norm_num_groups 32 does not divide block_out_channels\\[1\\] 48"):
        AutoencoderKLParams(**{**SD, "block_out_channels": (32, 48)})
    with pytest.raises(ValueError, match="act_fn='gelu'"):
        AutoencoderKL.from_config({**SD, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="overlap 1.0"):
        VaeTiling(overlap=1.0)
    no_attention = AutoencoderKL.from_config({**FLUX, "mid_block_add_attention": False})
    ref = RefVAE.from_config(no_attention.to_config())
    assert set(ref.state_dict()) == set(no_attention.state_dict())
    assert "encoder.mid_block.attentions.0.to_q.weight" not in no_attention.state_dict()
