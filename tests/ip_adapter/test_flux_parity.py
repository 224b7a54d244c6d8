"""Flux IP-Adapter (XLabs' format) against diffusers' FluxPipeline.load_ip_adapter on tiny random weights: same seed, same image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.blocks.standard.ip_adapter import clip_pixels
from tests.ip_adapter.ip_files import SIZE, picture

KWARGS: dict[str, Any] = dict(prompt="a red circle", height=SIZE, width=SIZE, num_inference_steps=2, max_sequence_length=16)
TRUE_CFG: dict[str, Any] = dict(negative_prompt="blurry", true_cfg_scale=3.0)


def run_both(ours: Pipeline, ref: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    expected = ref(**KWARGS, **kwargs, generator=torch.Generator().manual_seed(5), output_type="np").images
    images = ours(**KWARGS, **kwargs, generator=torch.Generator().manual_seed(5), output_type="np", progress=False).images
    return images, expected


def both(flux: tuple[Path, Path], weight_name: str | list[str] = "ip_adapter.safetensors", *, cls: str = "FluxPipeline") -> tuple[Pipeline, Any]:
    import diffusers

    repo, ip = flux
    ours = Pipeline.from_pretrained(str(repo))
    ours.load_ip_adapter(str(ip), weight_name=weight_name, image_encoder=str(ip / "image_encoder"))
    ref = getattr(diffusers, cls).from_pretrained(repo)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(ip), weight_name=weight_name, image_encoder_pretrained_model_name_or_path=str(ip / "image_encoder"),
                        image_encoder_dtype=torch.float32)  # fmt: skip
    return ours, ref


@pytest.mark.parametrize(
    "settings",
    [{}, TRUE_CFG, {**TRUE_CFG, "negative_ip_adapter_image": picture(4)}, {**TRUE_CFG, "ip_adapter_image": None, "negative_ip_adapter_image": picture(4)}],
    ids=["no-cfg", "true-cfg", "true-cfg-negative-image", "negative-image-only"],
)
def test_flux_matches_diffusers(flux: tuple[Path, Path], settings: dict[str, Any]) -> None:
    ours, ref = both(flux)
    kwargs = {"ip_adapter_image": picture(), **settings}
    images, expected = run_both(ours, ref, **kwargs)
    assert images.shape == expected.shape == (1, SIZE, SIZE, 3)
    assert np.abs(images - expected).max() < 1e-5
    plain = ours(**KWARGS, **{k: v for k, v in settings.items() if "ip_adapter" not in k}, output_type="np", progress=False,
                 generator=torch.Generator().manual_seed(5)).images  # fmt: skip
    assert np.abs(images - plain).max() > 1e-3  # the image prompt changes the image


def test_scales_per_block_two_adapters_and_several_images_match_diffusers(flux: tuple[Path, Path]) -> None:
    ours, ref = both(flux, ["ip_adapter.safetensors", "ip_adapter_4.safetensors"])
    for pipe in (ours, ref):
        pipe.set_ip_adapter_scale([0.7, [0.0, 1.3]])
    kwargs = dict(ip_adapter_image=[picture(0), [picture(1), picture(2)]], num_images_per_prompt=2, **TRUE_CFG)
    images, expected = run_both(ours, ref, **kwargs)
    assert images.shape == (2, SIZE, SIZE, 3) and np.abs(images - expected).max() < 1e-5
    assert [a.scales for a in ours.components["ip_adapter"]] == [(0.7, 0.7), (0.0, 1.3)]


def test_precomputed_embeddings_match_diffusers(flux: tuple[Path, Path]) -> None:
    ours, ref = both(flux)
    encoder = ours.components["image_encoder"]
    with torch.no_grad():
        embeds = encoder(clip_pixels(picture(), size=SIZE)).image_embeds  # (images, embed)
        black = encoder(clip_pixels(np.zeros((SIZE, SIZE, 3), dtype=np.uint8), size=SIZE)).image_embeds
    expected = ref(**KWARGS, **TRUE_CFG, ip_adapter_image_embeds=[embeds[None]], negative_ip_adapter_image_embeds=[black[None]],
                   generator=torch.Generator().manual_seed(5), output_type="np").images  # fmt: skip
    given = ours(**KWARGS, **TRUE_CFG, ip_adapter_image_embeds=[embeds], generator=torch.Generator().manual_seed(5),
                 output_type="np", progress=False).images  # fmt: skip
    assert np.abs(given - expected).max() < 1e-5  # the default negative is the black picture's embedding, as in diffusers


def test_img2img_matches_diffusers(flux: tuple[Path, Path]) -> None:
    ours, ref = both(flux, cls="FluxImg2ImgPipeline")
    # diffusers' img2img guides with 7.0 unless told; ours with dev's 3.5, as its text2img does
    images, expected = run_both(ours, ref, image=picture(6), strength=0.7, guidance_scale=3.5, ip_adapter_image=picture(), **TRUE_CFG)
    assert np.abs(images - expected).max() < 1e-5
