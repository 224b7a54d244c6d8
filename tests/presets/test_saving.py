"""Saving and pushing preset pipelines: the same image after loading back, and diffusers reads the folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.blocks.pipeline import PresetInfo
from diffblocks.blocks.sd import EncodePrompt
from diffblocks.blocks.standard import SchedulerStep
from diffblocks.components.guiders import (
    AbstractClassifierFreeGuider,
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    GuiderState,
    PerturbedAttentionGuidance,
)
from diffblocks.components.models.autoencoder_kl import AutoencoderKL
from diffblocks.components.schedulers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffblocks.presets.sd15 import sd15_blocks
from diffblocks.presets.structure import preset_of
from diffblocks.registry import RegistryError
from tests.hub_server import StandInHub
from tests.hubcache import add_cached_repo, use_hub_cache
from tests.presets.sd_fixtures import tiny_sd15

CALL = dict(
    prompt="a red circle", negative_prompt="blurry", height=32, width=32, num_inference_steps=3, output_type="np"
)


@pytest.fixture(scope="module")
def sd15_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd15(tmp_path_factory.mktemp("sd15") / "repo")


def image(pipe: Pipeline, seed: int = 0) -> np.ndarray:
    return pipe(**CALL, generator=torch.Generator().manual_seed(seed), progress=False).images


def listing(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def config_of(scheduler: Any) -> dict[str, Any]:
    """A scheduler's config without the keys left at default, which is not saved (as in diffusers)."""
    return {k: v for k, v in scheduler.to_config().items() if k != "_use_default_values"}


def modular_index(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "modular_model_index.json").read_text())


GUIDERS = {
    "apg": AdaptiveProjectedGuidance(guidance_scale=6.0, adaptive_projected_guidance_momentum=-0.5, eta=0.3),
    "pag": PerturbedAttentionGuidance.for_family(
        "sd15", guidance_scale=5.0, perturbed_guidance_scale=2.0, perturbed_guidance_start=0.0
    ),
}


@pytest.mark.parametrize("guider", GUIDERS.values(), ids=GUIDERS.keys())
def test_saved_pipeline_gives_the_same_image(
    sd15_repo: Path, tmp_path: Path, guider: AbstractClassifierFreeGuider
) -> None:
    pipe = Pipeline.from_pretrained(str(sd15_repo))
    scheduler = EulerDiscreteScheduler.from_config(pipe.components["scheduler"].to_config())
    scheduler = scheduler.replace(use_karras_sigmas=True)
    pipe.update_components(guider=guider, scheduler=scheduler)
    expected = image(pipe)

    folder = pipe.save_pretrained(tmp_path / "saved")
    index = modular_index(folder)
    assert index["_class_name"] == "StableDiffusionPipeline" and index["family"] == "sd15"
    assert index["guider"][:2] == ["diffusers", type(guider).__name__]
    assert index["scheduler"][:2] == ["diffusers", "EulerDiscreteScheduler"]
    assert index["requires_safety_checker"] is False  # the repository's settings travel along

    back = Pipeline.from_pretrained(str(folder))
    assert back.components["guider"] == guider
    assert config_of(back.components["scheduler"]) == config_of(scheduler)
    assert np.array_equal(image(back), expected)


def test_diffusers_reads_the_saved_folder(sd15_repo: Path, tmp_path: Path) -> None:
    import diffusers

    folder = Pipeline.from_pretrained(str(sd15_repo)).save_pretrained(tmp_path / "saved")
    classic = json.loads((folder / "model_index.json").read_text())
    assert classic["_class_name"] == "StableDiffusionPipeline" and classic["requires_safety_checker"] is False
    assert "guider" not in classic and "family" not in classic
    assert classic["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert classic["text_encoder"] == ["transformers", "CLIPTextModel"]

    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    expected = reference(**CALL, guidance_scale=7.5, generator=torch.Generator().manual_seed(0)).images
    ours = image(Pipeline.from_pretrained(str(folder)))
    assert np.abs(ours - expected).max() < 1e-5  # measured: 1.1e-6


def test_hub_references_stay_references_unless_copied(
    sd15_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = use_hub_cache(monkeypatch, tmp_path / "cache")
    add_cached_repo(cache, "org/tiny-sd15", sd15_repo)
    pipe = Pipeline.from_pretrained("org/tiny-sd15")
    pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=4.0))
    expected = image(pipe)  # loads every component: references are decided by kind, not by what is loaded

    small = pipe.save_pretrained(tmp_path / "small")
    assert sorted(listing(small)) == ["guider/guider_config.json", "modular_model_index.json"]
    unet = modular_index(small)["unet"][2]
    assert (unet["pretrained_model_name_or_path"], unet["subfolder"]) == ("org/tiny-sd15", "unet")
    assert np.array_equal(image(Pipeline.from_pretrained(str(small))), expected)

    full = pipe.save_pretrained(tmp_path / "full", copy_references=True)
    copied = {"unet/diffusion_pytorch_model.safetensors", "model_index.json", "tokenizer/tokenizer.json"}
    assert copied <= listing(full).keys()
    assert modular_index(full)["unet"][2]["pretrained_model_name_or_path"] is None  # the folder itself


def test_variant_dtype_and_shards_round_trip(sd15_repo: Path, tmp_path: Path) -> None:
    pipe = Pipeline.from_pretrained(str(sd15_repo), dtype=torch.bfloat16)
    variant = pipe.save_pretrained(tmp_path / "variant", variant="bf16")
    sharded = pipe.save_pretrained(tmp_path / "sharded", max_shard_size="1MB")
    named = {"unet/diffusion_pytorch_model.bf16.safetensors", "text_encoder/model.bf16.safetensors"}
    assert named <= listing(variant).keys()
    assert len(list((sharded / "unet").glob("diffusion_pytorch_model-0000?-of-0000?.safetensors"))) > 1
    assert len(list((sharded / "text_encoder").glob("model-0000?-of-0000?.safetensors"))) > 1
    assert modular_index(variant)["unet"][2]["variant"] == "bf16"
    assert modular_index(sharded)["_diffblocks_dtypes"]["text_encoder"] == "bfloat16"

    for folder in (variant, sharded):
        back = Pipeline.from_pretrained(str(folder))  # the index says which variant and dtype
        for name in ("unet", "vae", "text_encoder"):
            saved, loaded = pipe.components[name].state_dict(), back.components[name].state_dict()
            assert saved.keys() == loaded.keys()
            assert all(torch.equal(saved[key], loaded[key]) and saved[key].dtype == loaded[key].dtype for key in saved)
        assert next(back.components["unet"].parameters()).dtype == torch.bfloat16


def test_existing_folders(sd15_repo: Path, tmp_path: Path) -> None:
    pipe = Pipeline.from_pretrained(str(sd15_repo))
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="Pass overwrite=True"):
        pipe.save_pretrained(foreign)
    assert listing(foreign).keys() == {"todo.txt"}
    pipe.save_pretrained(foreign, overwrite=True)
    assert "todo.txt" not in listing(foreign) and (foreign / "modular_model_index.json").is_file()

    # a saved pipeline is replaced as a whole, even by a pipeline loaded lazily from that very folder
    saved = listing(foreign)
    Pipeline.from_pretrained(str(foreign)).save_pretrained(foreign)
    assert listing(foreign) == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # no staging folders left behind


class UnlistedGuider(AbstractClassifierFreeGuider):
    """CFG under a name the registry does not allow."""

    def combine(self, predictions: Any, *, state: GuiderState | None, step_index: int, num_steps: int) -> torch.Tensor:
        cond, uncond = predictions
        return uncond + self.guidance_scale * (cond - uncond)


def test_failures_write_nothing(sd15_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = Pipeline.from_pretrained(str(sd15_repo)).update_components(guider=UnlistedGuider())
    with pytest.raises(RegistryError, match="UnlistedGuider is not a registered component"):
        pipe.save_pretrained(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []

    pipe = Pipeline.from_pretrained(str(sd15_repo))
    with pytest.raises(ValueError, match="safetensors only"):
        pipe.save_pretrained(tmp_path / "new", safe_serialization=False)
    previous = pipe.save_pretrained(tmp_path / "saved")
    before = listing(previous)

    def broken(self: AutoencoderKL, folder: Path, **options: Any) -> None:
        (Path(folder) / "config.json").parent.mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text("{")
        raise OSError("disk full")

    monkeypatch.setattr(AutoencoderKL, "save_pretrained", broken)
    pipe.update_components(scheduler=DPMSolverMultistepScheduler.from_config(pipe.components["scheduler"].to_config()))
    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(previous)
    assert listing(previous) == before  # the earlier save is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_blocks_that_cannot_be_saved_are_refused(sd15_repo: Path, tmp_path: Path) -> None:
    pipe = Pipeline.from_pretrained(str(sd15_repo))

    class MyStep(SchedulerStep):
        """A research step defined in a function: neither registered nor in a module file that can be saved."""

    pipe.replace_block("workflow.text2img.denoise.step", MyStep(name="step"))
    message = r"block 'workflow.text2img.denoise.step' is a .*MyStep, .* it is defined inside a function"
    with pytest.raises(ValueError, match=message):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_preset_is_recognised_named_or_refused(sd15_repo: Path, tmp_path: Path) -> None:
    loaded = Pipeline.from_pretrained(str(sd15_repo))
    hand_built = Pipeline(sd15_blocks(), loaded.components)
    assert hand_built.preset is None and preset_of(hand_built) == PresetInfo("sd15")

    class MyEncodePrompt(EncodePrompt):
        """Prompt weighting, say: no preset has it."""

    hand_built.replace_block("encode_prompt", MyEncodePrompt(name="encode_prompt"))
    with pytest.raises(ValueError, match="its blocks are not those of any preset"):
        preset_of(hand_built)

    # a folder the index named by a package reference is saved as that reference, not copied
    loaded.preset = PresetInfo("sd15", "StableDiffusionPipeline", {}, {str(sd15_repo): "package://somepackage/model"})
    folder = loaded.save_pretrained(tmp_path / "saved")
    assert sorted(listing(folder)) == ["guider/guider_config.json", "modular_model_index.json"]
    unet = modular_index(folder)["unet"][2]
    assert (unet["pretrained_model_name_or_path"], unet["subfolder"]) == ("package://somepackage/model", "unet")


def test_push_to_hub_and_load_by_repo_id(sd15_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    pipe = Pipeline.from_pretrained(str(sd15_repo))
    pipe.update_components(guider=GUIDERS["apg"])
    expected = image(pipe)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with StandInHub(lifetime=120) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        info = pipe.push_to_hub("me/tiny-sd15", token="test-token", private=True, commit_message="first version")
        pull = pipe.push_to_hub("me/tiny-sd15", token="test-token", create_pr=True)
    assert info.oid == hub.repos["me/tiny-sd15"].refs["main"] and hub.repos["me/tiny-sd15"].private
    assert pull.pr_url is not None and pull.pr_url.endswith("/me/tiny-sd15/discussions/1")
    assert all(r.handled for r in hub.requests), [r for r in hub.requests if not r.handled]
    assert {r.authorization for r in hub.requests if r.path.startswith("/api/models/")} == {"Bearer test-token"}

    exported = tmp_path / "exported"
    commit = hub.export("me/tiny-sd15", exported)
    assert commit == info.oid and set(listing(exported)) == set(listing(pipe.save_pretrained(tmp_path / "local")))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = use_hub_cache(monkeypatch, tmp_path / "cache")
    add_cached_repo(cache, "me/tiny-sd15", exported, commit=commit)
    back = Pipeline.from_pretrained("me/tiny-sd15")
    assert back.components["guider"] == GUIDERS["apg"]
    assert np.array_equal(image(back), expected)


def test_push_to_hub_refuses_before_saving(sd15_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    pipe = Pipeline.from_pretrained(str(sd15_repo))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineModeIsEnabled, match="offline mode is on"):
        pipe.push_to_hub("me/tiny-sd15")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # never contacted
    with pytest.raises(ValueError, match="revision='dev' cannot be combined"):
        pipe.push_to_hub("me/tiny-sd15", revision="dev", create_pr=True)
