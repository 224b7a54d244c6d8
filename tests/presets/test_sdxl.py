"""SDXL preset against diffusers' SDXL pipelines on tiny random weights: same seed, same image."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from diffblocks.blocks import InputError, Pipeline
from diffblocks.components.denoisers import Conditioning
from diffblocks.presets import sdxl
from tests.presets.sd_fixtures import tiny_sdxl

SIZE = 32


@pytest.fixture(scope="module")
def sdxl_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def ours(sdxl_repo: Path) -> Pipeline:
    return Pipeline.from_pretrained(str(sdxl_repo))


def reference(kind: str, repo: Path, **kwargs: Any) -> Any:
    import diffusers

    cls = {"text2img": diffusers.StableDiffusionXLPipeline, "img2img": diffusers.StableDiffusionXLImg2ImgPipeline}.get(
        kind, diffusers.StableDiffusionXLInpaintPipeline
    )
    pipe = cls.from_pretrained(repo, add_watermarker=False, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_both(ours: Pipeline, ref: Any, seed: int = 7, **kwargs: Any) -> tuple[Any, np.ndarray]:
    kwargs.setdefault("num_inference_steps", 3)
    expected = ref(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="np").images
    out = ours(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="np", progress=False)
    return out, expected


def image() -> PIL.Image.Image:
    return PIL.Image.fromarray((np.random.default_rng(1).random((SIZE, SIZE, 3)) * 255).astype("uint8"))


def mask() -> PIL.Image.Image:
    pixels = np.zeros((SIZE, SIZE), dtype=np.uint8)
    pixels[8:28, 2:18] = 255
    return PIL.Image.fromarray(pixels)


def test_index_picks_the_sdxl_preset(ours: Pipeline) -> None:
    assert ours.name.startswith("sdxl:")
    assert ours.workflows == ("inpaint", "img2img", "text2img")
    assert ours.components["guider"].guidance_scale == 5.0


def test_text2img_matches_diffusers(ours: Pipeline, sdxl_repo: Path) -> None:
    # no negative prompt: SDXL base guides away from zero embeddings (force_zeros_for_empty_prompt)
    out, expected = run_both(ours, reference("text2img", sdxl_repo), prompt=["a red circle", "a cat"], height=SIZE, width=SIZE)
    assert out.workflow == "text2img"
    assert out.images.shape == expected.shape == (2, SIZE, SIZE, 3)
    assert np.abs(out.images - expected).max() < 1e-5


def test_text2img_with_negatives_sizes_and_second_prompt_matches_diffusers(ours: Pipeline, sdxl_repo: Path) -> None:
    # one image: with several, diffusers' text2img pairs negative and positive time ids with the wrong rows
    kwargs = dict(
        prompt="a red circle",
        prompt_2="a blue square",
        negative_prompt="blurry",
        height=SIZE,
        width=SIZE,
        guidance_scale=4.0,
        original_size=(64, 48),
        crops_coords_top_left=(4, 8),
        target_size=(40, 40),
        negative_original_size=(16, 16),
        negative_crops_coords_top_left=(4, 8),
        negative_target_size=(24, 32),
        clip_skip=1,
    )
    out, expected = run_both(ours, reference("text2img", sdxl_repo), **kwargs)
    assert np.abs(out.images - expected).max() < 1e-5
    assert out.conditioning.time_ids[0].tolist() == [64, 48, 4, 8, 40, 40]
    assert out.negative_conditioning.time_ids[0].tolist() == [16, 16, 4, 8, 24, 32]


def test_empty_prompt_encoding_when_the_index_says_so(sdxl_repo: Path, tmp_path: Path) -> None:
    repo = Path(shutil.copytree(sdxl_repo, tmp_path / "repo"))
    index = json.loads((repo / "model_index.json").read_text())
    (repo / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    ours = Pipeline.from_pretrained(str(repo))
    ref = reference("text2img", repo)
    assert ref.config.force_zeros_for_empty_prompt is False
    out, expected = run_both(ours, ref, prompt="a red circle", height=SIZE, width=SIZE, num_inference_steps=2)
    assert out.negative_conditioning.pooled_embeds.abs().sum() > 0
    assert np.abs(out.images - expected).max() < 1e-5


def test_img2img_matches_diffusers(ours: Pipeline, sdxl_repo: Path) -> None:
    kwargs = dict(prompt="a red circle", image=image(), strength=0.6, num_images_per_prompt=2, negative_original_size=(16, 24))
    out, expected = run_both(ours, reference("img2img", sdxl_repo), **kwargs, num_inference_steps=5)
    assert out.workflow == "img2img"
    assert out.conditioning.time_ids.tolist() == [[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2
    assert out.negative_conditioning.time_ids.tolist() == [[16, 24, 0, 0, SIZE, SIZE]] * 2
    assert np.abs(out.images - expected).max() < 1e-5


def test_inpaint_plain_unet_matches_diffusers(ours: Pipeline, sdxl_repo: Path) -> None:
    kwargs = dict(prompt="a red circle", image=image(), mask_image=mask(), height=SIZE, width=SIZE, strength=0.8, num_images_per_prompt=2)
    kwargs.update(guidance_scale=5.0)  # diffusers' SDXL inpainting defaults to 7.5
    out, expected = run_both(ours, reference("inpaint", sdxl_repo), **kwargs, num_inference_steps=4)
    assert out.workflow == "inpaint"
    assert np.abs(out.images - expected).max() < 1e-5


def test_inpaint_inpainting_unet_matches_diffusers(tmp_path: Path) -> None:
    repo = tiny_sdxl(tmp_path / "sdxl_inpaint", in_channels=9)
    ours = Pipeline.from_pretrained(str(repo))
    kwargs = dict(prompt="a red circle", negative_prompt="dark", image=image(), mask_image=mask(), height=SIZE, width=SIZE, strength=1.0)
    kwargs.update(guidance_scale=6.0)
    out, expected = run_both(ours, reference("inpaint", repo), **kwargs)
    assert np.abs(out.images - expected).max() < 1e-5


def test_aesthetic_score_conditioning_for_refiner_style_models(ours: Pipeline) -> None:
    # a UNet trained on 6 time ids rejects the refiner's 5, and the message says which setting to change
    blocks = sdxl.sdxl_blocks(requires_aesthetics_score=True)
    refiner_like = Pipeline(blocks, ours.components)
    with pytest.raises(ValueError, match="expects 6 time ids: build the blocks with requires_aesthetics_score=False"):
        refiner_like(prompt="x", height=SIZE, width=SIZE, num_inference_steps=1, progress=False)


def test_second_prompt_lists_must_pair(ours: Pipeline) -> None:
    with pytest.raises(InputError, match=r"\[encode_prompt\] prompt_2: prompt_2 has 3 entries but prompt has 2"):
        ours(prompt=["a", "b"], prompt_2=["a", "b", "c"], progress=False)


def test_float16_runs_the_vae_in_float32_when_its_config_says_so(sdxl_repo: Path) -> None:
    pipe = Pipeline.from_pretrained(str(sdxl_repo), dtype=torch.float16)
    vae = pipe.components["vae"]
    assert vae.force_upcast and next(vae.parameters()).dtype == torch.float16
    seen: list[torch.dtype] = []
    for part in (vae.encoder, vae.decoder):
        part.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    out = pipe(prompt="a red circle", image=image(), strength=0.5, num_inference_steps=2, output_type="np", progress=False)
    assert seen == [torch.float32, torch.float32]  # encode and decode upcast...
    assert next(vae.parameters()).dtype == torch.float16  # ...and the VAE is back in float16 afterwards
    assert out.latents.dtype == torch.float16 and np.isfinite(out.images).all()


def test_second_encoder_alone_encodes_like_the_refiner(ours: Pipeline) -> None:
    from diffblocks.blocks.sd import EncodePromptXL, PrepareTimeIds

    parts = ours.components
    encode = EncodePromptXL().bind({"text_encoder_2": parts["text_encoder_2"], "tokenizer_2": parts["tokenizer_2"]})
    out = encode(EncodePromptXL.Inputs(prompt=["a", "b"], negative_prompt="c", num_images_per_prompt=2))
    assert out.conditioning.prompt_embeds.shape == (4, 77, 32)  # the second encoder's width only
    negative_pooled = out.negative_conditioning.pooled_embeds
    assert negative_pooled is not None and negative_pooled.shape == (4, 32) and out.batch_size == 4

    ids = PrepareTimeIds(requires_aesthetics_score=True).bind({"unet": parts["unet"]})
    with pytest.raises(ValueError, match="expects 6 time ids"):
        ids(PrepareTimeIds.Inputs(conditioning=out.conditioning, negative_conditioning=out.negative_conditioning, height=8, width=8))


def test_aesthetic_time_ids() -> None:
    from diffblocks.blocks.sd import PrepareTimeIds
    from diffblocks.components.models.unet import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config({
        "block_out_channels": (32,), "down_block_types": ("DownBlock2D",), "up_block_types": ("UpBlock2D",),
        "layers_per_block": 1, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 5 * 8 + 4, "attention_head_dim": 2, "cross_attention_dim": 8,
    })
    block = PrepareTimeIds(requires_aesthetics_score=True).bind({"unet": unet})
    pooled = Conditioning(torch.zeros(2, 1, 8), pooled_embeds=torch.zeros(2, 4))
    out = block(PrepareTimeIds.Inputs(conditioning=pooled, negative_conditioning=pooled, height=64, width=48, crops_coords_top_left=(2, 3)))
    time_ids, negative_time_ids = out.conditioning.time_ids, out.negative_conditioning.time_ids
    assert time_ids is not None and time_ids.tolist() == [[64, 48, 2, 3, 6.0]] * 2
    assert negative_time_ids is not None and negative_time_ids.tolist() == [[64, 48, 2, 3, 2.5]] * 2
