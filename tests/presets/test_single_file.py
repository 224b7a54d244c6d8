"""Pipelines from single-file checkpoints against diffusers' ``from_single_file``: same weights, same image.

The files are written by the tests from tiny random diffusers repositories, in the original
layouts (see ``tests/models/single_file_fixtures.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from diffblocks.blocks import Pipeline
from tests.hubcache import add_cached_repo, use_hub_cache
from tests.models.single_file_fixtures import (
    FLUX_ALL_IN_ONE,
    FLUX_TRANSFORMER,
    LDM_EXTRAS,
    SD1,
    SD2,
    SDXL,
    SDXL_REFINER,
    write_single_file,
)
from tests.presets.flux_fixtures import tiny_flux
from tests.presets.sd_fixtures import tiny_sd2, tiny_sd15, tiny_sdxl, tiny_sdxl_refiner

SIZE = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """kind -> (diffusers repository, single file written from it)."""
    root = tmp_path_factory.mktemp("single_file")
    made = {
        "sd1": (tiny_sd15(root / "sd1"), SD1, LDM_EXTRAS),
        "sd2": (tiny_sd2(root / "sd2"), SD2, LDM_EXTRAS),
        "sdxl": (tiny_sdxl(root / "sdxl", second_width=48), SDXL, None),
        "sdxl-refiner": (tiny_sdxl_refiner(root / "refiner"), SDXL_REFINER, None),
    }
    out = {kind: (repo, write_single_file(repo, root / f"{kind}.safetensors", parts, extras=extras)) for kind, (repo, parts, extras) in made.items()}
    for kind in ("dev", "schnell"):
        repo = tiny_flux(root / f"flux-{kind}", guidance_embeds=kind == "dev")
        out[f"flux-{kind}"] = (repo, write_single_file(repo, root / f"flux1-{kind}-all-in-one.safetensors", FLUX_ALL_IN_ONE))
        out[f"flux-{kind}-transformer"] = (repo, write_single_file(repo, root / f"flux1-{kind}.safetensors", FLUX_TRANSFORMER))
    return out


def reference(cls_name: str, file: Path, repo: Path, **kwargs: Any) -> Any:
    import diffusers

    pipe = getattr(diffusers, cls_name).from_single_file(str(file), config=str(repo), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_same_weights(ours: Pipeline, ref: Any, names: tuple[str, ...]) -> None:
    for name in names:
        mine, theirs = ours.components[name].state_dict(), getattr(ref, name).state_dict()
        assert set(mine) == set(theirs), name
        assert all(torch.equal(mine[key], theirs[key]) for key in theirs), name


def images(pipe: Any, *, ours: bool, seed: int = 7, **kwargs: Any) -> np.ndarray:
    extra = {"progress": False} if ours else {}
    out = pipe(**kwargs, num_inference_steps=3, generator=torch.Generator().manual_seed(seed), output_type="np", **extra)
    return np.asarray(out.images)


def test_sd1_matches_diffusers(files: dict[str, tuple[Path, Path]]) -> None:
    repo, file = files["sd1"]
    ours = Pipeline.from_single_file(file, config=str(repo))
    ref = reference("StableDiffusionPipeline", file, repo, safety_checker=None)
    assert_same_weights(ours, ref, ("unet", "vae", "text_encoder"))
    kwargs = dict(prompt="a red circle", negative_prompt="blurry", height=SIZE, width=SIZE, guidance_scale=6.0)
    assert np.abs(images(ours, ours=True, **kwargs) - images(ref, ours=False, **kwargs)).max() < 1e-5


def test_sd2_config_inferred_is_v_prediction(files: dict[str, tuple[Path, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # without config=, the released SD 2.1 repository (here a tiny stand-in in the Hub cache) completes the file
    repo, file = files["sd2"]
    add_cached_repo(use_hub_cache(monkeypatch, tmp_path / "hub"), "stabilityai/stable-diffusion-2-1", repo)
    ours = Pipeline.from_single_file(file)
    assert ours.components["scheduler"].prediction_type == "v_prediction"
    assert ours.components["unet"].params.attention_head_dim == (1, 2)  # heads of 64 channels, as SD 2.x
    ref = reference("StableDiffusionPipeline", file, repo, safety_checker=None)
    assert_same_weights(ours, ref, ("unet", "vae", "text_encoder"))
    kwargs = dict(prompt="a red circle", height=SIZE, width=SIZE, guidance_scale=5.0)
    assert np.abs(images(ours, ours=True, **kwargs) - images(ref, ours=False, **kwargs)).max() < 1e-5


def test_sd1_from_a_hub_file(files: dict[str, tuple[Path, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo, file = files["sd1"]
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "model.safetensors").write_bytes(file.read_bytes())
    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    add_cached_repo(cache, "someone/finetune", checkpoints)
    add_cached_repo(cache, "stable-diffusion-v1-5/stable-diffusion-v1-5", repo)
    ours = Pipeline.from_single_file("someone/finetune/model.safetensors")
    direct = Pipeline.from_single_file(file, config=str(repo))
    kwargs = dict(prompt="a red circle", height=SIZE, width=SIZE)
    assert np.array_equal(images(ours, ours=True, **kwargs), images(direct, ours=True, **kwargs))


def test_missing_default_repository_says_what_to_pass(files: dict[str, tuple[Path, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_hub_cache(monkeypatch, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"stable-diffusion-v1-5/stable-diffusion-v1-5.*pass config="):
        Pipeline.from_single_file(files["sd1"][1])


def test_sdxl_base_matches_diffusers(files: dict[str, tuple[Path, Path]]) -> None:
    repo, file = files["sdxl"]
    ours = Pipeline.from_single_file(file, config=str(repo))
    ref = reference("StableDiffusionXLPipeline", file, repo, add_watermarker=False)
    assert_same_weights(ours, ref, ("unet", "vae", "text_encoder", "text_encoder_2"))
    kwargs = dict(prompt="a red circle", height=SIZE, width=SIZE, guidance_scale=5.0)
    assert np.abs(images(ours, ours=True, **kwargs) - images(ref, ours=False, **kwargs)).max() < 1e-5


def test_sdxl_refiner_matches_diffusers(files: dict[str, tuple[Path, Path]]) -> None:
    repo, file = files["sdxl-refiner"]
    ours = Pipeline.from_single_file(file, config=str(repo))
    ref = reference("StableDiffusionXLImg2ImgPipeline", file, repo, add_watermarker=False)
    assert "text_encoder" not in ours.components  # the refiner has the OpenCLIP encoder only
    assert_same_weights(ours, ref, ("unet", "vae", "text_encoder_2"))
    image = PIL.Image.fromarray((np.random.default_rng(1).random((SIZE, SIZE, 3)) * 255).astype("uint8"))
    kwargs = dict(prompt="a red circle", image=image, strength=0.6, guidance_scale=5.0)
    assert np.abs(images(ours, ours=True, **kwargs) - images(ref, ours=False, **kwargs)).max() < 1e-5


@pytest.mark.parametrize("kind", ["dev", "schnell"])
@pytest.mark.parametrize("bundle", ["all-in-one", "transformer"])
def test_flux_matches_diffusers(files: dict[str, tuple[Path, Path]], kind: str, bundle: str) -> None:
    # diffusers' BFL converter assumes Flux.1's 3072-wide blocks, so it cannot read tiny files: the
    # reference is diffusers' pipeline on the repository the file was written from
    import diffusers

    repo, file = files[f"flux-{kind}" if bundle == "all-in-one" else f"flux-{kind}-transformer"]
    ours = Pipeline.from_single_file(file, config=str(repo))
    ref = diffusers.FluxPipeline.from_pretrained(repo)
    ref.set_progress_bar_config(disable=True)
    assert_same_weights(ours, ref, ("transformer", "vae", "text_encoder", "text_encoder_2"))
    kwargs = dict(prompt="a red circle", height=SIZE, width=SIZE, guidance_scale=3.5, max_sequence_length=16)
    assert np.abs(images(ours, ours=True, **kwargs) - images(ref, ours=False, **kwargs)).max() < 1e-5


def test_a_single_file_pipeline_saves_as_a_diffusers_folder(files: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    import diffusers

    repo, file = files["sdxl"]
    ours = Pipeline.from_single_file(file, config=str(repo))
    ours.save_pretrained(tmp_path / "converted")
    again = Pipeline.from_pretrained(str(tmp_path / "converted"))
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "converted", add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red circle", height=SIZE, width=SIZE)
    expected = images(ours, ours=True, **kwargs)
    assert np.abs(images(again, ours=True, **kwargs) - expected).max() < 1e-5  # float32 kernels round by address
    assert np.abs(images(ref, ours=False, **kwargs) - expected).max() < 1e-5


def test_dtype_applies_to_every_model_of_the_file(files: dict[str, tuple[Path, Path]]) -> None:
    repo, file = files["sd1"]
    ours = Pipeline.from_single_file(file, config=str(repo), dtype=torch.bfloat16)
    for name in ("unet", "vae", "text_encoder"):
        assert next(ours.components[name].parameters()).dtype == torch.bfloat16, name
