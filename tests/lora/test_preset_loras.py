"""LoRAs saved with a preset: copied or pinned, hashed, and applied again by from_pretrained for the same image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as RefUNet
from safetensors.torch import load_file

from diffblocks.blocks import Pipeline
from diffblocks.components.containment import RepositoryPathError
from diffblocks.components.lora import LoRA, inject
from tests.hub_server import StandInHub
from tests.hubcache import add_cached_repo, use_hub_cache
from tests.lora.lora_files import peft_lora
from tests.presets.sd_fixtures import tiny_sd15

CALL = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, output_type="np", progress=False)
COMMIT = "1" * 40


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd15(tmp_path_factory.mktemp("sd15") / "repo")


@pytest.fixture(scope="module")
def loras(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ref = RefUNet.from_pretrained(repo / "unet")
    folder = tmp_path_factory.mktemp("loras")
    return {name: peft_lora(ref, folder / name, seed=seed, rank=2) for name, seed in (("a", 1), ("b", 2))}


def image(pipe: Pipeline) -> np.ndarray:
    return pipe(**CALL, generator=torch.Generator().manual_seed(0)).images


def entries(folder: Path) -> list[dict]:
    return json.loads((folder / "modular_model_index.json").read_text())["_diffblocks_loras"]


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_local_loras_are_copied_in_and_give_the_same_image(repo: Path, loras: dict[str, Path], fused: bool, tmp_path: Path) -> None:
    pipe = Pipeline.from_pretrained(str(repo))
    plain_unet = {k: v.clone() for k, v in pipe.components["unet"].state_dict().items()}
    pipe.load_lora_weights(loras["a"], adapter_name="style")
    pipe.load_lora_weights(loras["b"], adapter_name="ink")
    pipe.set_adapters(["style", "ink"], [0.7, 0.4])
    if fused:
        pipe.fuse_lora()
    expected = image(pipe)
    saved = pipe.save_pretrained(tmp_path / "saved")

    assert [(e["adapter_name"], e["weight"], e["fused"], e["file"], e["repo"]) for e in entries(saved)] == [
        ("style", 0.7, fused, "loras/style.safetensors", None),
        ("ink", 0.4, fused, "loras/ink.safetensors", None),
    ]
    assert (saved / "loras/style.safetensors").read_bytes() == loras["a"].read_bytes()
    # the denoiser is saved as itself: its own names and weights, without the adapters, fused or not
    written = load_file(saved / "unet" / "diffusion_pytorch_model.safetensors")
    assert written.keys() == plain_unet.keys() and all(torch.equal(written[k], v) for k, v in plain_unet.items())
    assert np.array_equal(image(pipe), expected)  # the pipeline saved keeps its adapters

    back = Pipeline.from_pretrained(str(saved))
    assert back.get_active_adapters() == ["style", "ink"]
    assert np.array_equal(image(back), expected)
    again = back.save_pretrained(tmp_path / "again")  # the loaded preset saves its adapters again
    assert entries(again) == entries(saved)


def test_a_changed_file_or_a_path_out_of_the_folder_is_refused(repo: Path, loras: dict[str, Path], tmp_path: Path) -> None:
    pipe = Pipeline.from_pretrained(str(repo))
    pipe.load_lora_weights(loras["a"], adapter_name="style")
    saved = pipe.save_pretrained(tmp_path / "saved")
    index = saved / "modular_model_index.json"
    data = json.loads(index.read_text())

    (saved / "loras/style.safetensors").write_bytes(loras["b"].read_bytes())
    with pytest.raises(ValueError, match=r"style\.safetensors: its sha256 is .* records .* for LoRA 'style'"):
        Pipeline.from_pretrained(str(saved))

    (tmp_path / "outside.safetensors").write_bytes(loras["a"].read_bytes())
    data["_diffblocks_loras"][0]["file"] = "../outside.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(RepositoryPathError, match="names '../outside.safetensors'"):
        Pipeline.from_pretrained(str(saved))
    data["_diffblocks_loras"][0] |= {"file": "loras/style.safetensors", "repo": str(tmp_path)}
    index.write_text(json.dumps(data))
    with pytest.raises(RepositoryPathError, match="names .* as the LoRA.s repository, which is not a Hub id"):
        Pipeline.from_pretrained(str(saved))
    data["_diffblocks_loras"][0] |= {"repo": None, "sha256": "not a hash"}
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="is not a list of LoRA references"):
        Pipeline.from_pretrained(str(saved))


def test_a_lora_without_a_file_or_from_a_pickle_cannot_be_saved(repo: Path, loras: dict[str, Path], tmp_path: Path) -> None:
    pipe = Pipeline.from_pretrained(str(repo))
    unet = pipe.components["unet"]
    read = LoRA.from_file(loras["a"], unet, name="made")
    inject(unet, LoRA("made", read.layers))
    with pytest.raises(ValueError, match="LoRA 'made' on the UNet2DConditionModel was attached from tensors"):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    pipe.unload_lora_weights()
    pickle = tmp_path / "lora.bin"
    torch.save(load_file(loras["a"]), pickle)
    pipe.load_lora_weights(pickle, adapter_name="old", allow_pickle=True)
    with pytest.raises(ValueError, match="was read from the pickle .*lora.bin; a saved preset holds safetensors"):
        pipe.save_pretrained(tmp_path / "saved")


def test_a_hub_lora_stays_a_pinned_reference_and_push_to_hub_round_trips(
    repo: Path, loras: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    cache = use_hub_cache(monkeypatch, tmp_path / "cache")
    source = tmp_path / "hub_lora"
    source.mkdir()
    (source / "ink.safetensors").write_bytes(loras["b"].read_bytes())
    add_cached_repo(cache, "someone/ink-lora", source, commit=COMMIT)
    pipe = Pipeline.from_pretrained(str(repo))
    pipe.load_lora_weights(loras["a"], adapter_name="style")
    pipe.load_lora_weights("someone/ink-lora", weight_name="ink.safetensors", adapter_name="ink")
    pipe.set_adapters(["style", "ink"], [0.7, 0.4])
    expected = image(pipe)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with StandInHub(lifetime=120) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        info = pipe.push_to_hub("me/tiny-sd15-lora", token="test-token")
    exported = tmp_path / "exported"
    commit = hub.export("me/tiny-sd15-lora", exported)
    assert commit == info.oid and (exported / "loras/style.safetensors").is_file()
    assert [(e["file"], e["repo"], e["revision"]) for e in entries(exported)] == [
        ("loras/style.safetensors", None, None),
        ("ink.safetensors", "someone/ink-lora", COMMIT),
    ]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_cached_repo(cache, "me/tiny-sd15-lora", exported, commit=commit)
    back = Pipeline.from_pretrained("me/tiny-sd15-lora")
    assert np.array_equal(image(back), expected)


def test_a_lora_of_unet_and_text_encoder_is_one_entry_and_both_models_save_without_it(
    repo: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    from tests.lora.test_text_encoder_lora import CLIP_LAYERS, file_names, kohya_keys, random_update

    pipe = Pipeline.from_pretrained(str(repo))
    encoder = pipe.components["text_encoder"]
    plain_encoder = {k: v.clone() for k, v in encoder.state_dict().items()}
    both = tmp_path / "both.safetensors"
    update = file_names(random_update(encoder, CLIP_LAYERS, seed=3), encoder)
    save_file({**load_file(loras["a"]), **kohya_keys(update, "lora_te_")}, str(both))
    pipe.load_lora_weights(both, adapter_name="both")
    pipe.set_adapters("both", 0.6)
    expected = image(pipe)
    saved = pipe.save_pretrained(tmp_path / "saved")

    assert [(e["adapter_name"], e["weight"], e["file"]) for e in entries(saved)] == [("both", 0.6, "loras/both.safetensors")]
    written = load_file(next((saved / "text_encoder").glob("*.safetensors")))
    assert written.keys() == plain_encoder.keys() and all(torch.equal(written[k], v) for k, v in plain_encoder.items())
    back = Pipeline.from_pretrained(str(saved))
    assert back.get_active_adapters() == ["both"]
    assert np.array_equal(image(back), expected)


def test_saving_disabled_loras_is_refused_as_the_preset_would_load_them_enabled(
    repo: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    pipe = Pipeline.from_pretrained(str(repo))
    pipe.load_lora_weights(loras["a"], adapter_name="style")
    pipe.disable_lora()
    with pytest.raises(ValueError, match=r"LoRA adapters of the UNet2DConditionModel are disabled.*pipe.enable_lora\(\)"):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    pipe.enable_lora()
    expected = image(pipe)
    assert np.array_equal(image(Pipeline.from_pretrained(str(pipe.save_pretrained(tmp_path / "saved")))), expected)


def test_an_index_naming_one_adapter_twice_is_refused_before_a_shared_model_changes(
    repo: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    from diffblocks.components import ComponentsManager
    from diffblocks.components.lora import adapter_names

    pipe = Pipeline.from_pretrained(str(repo))
    pipe.load_lora_weights(loras["a"], adapter_name="style")
    pipe.load_lora_weights(loras["b"], adapter_name="ink")
    saved = pipe.save_pretrained(tmp_path / "saved")
    index = saved / "modular_model_index.json"
    data = json.loads(index.read_text())
    data["_diffblocks_loras"][1]["adapter_name"] = "style"  # two files under one name
    index.write_text(json.dumps(data))
    manager = ComponentsManager()
    with pytest.raises(ValueError, match=r"is not a list of LoRA references \(adapter 'style' is given twice\)"):
        Pipeline.from_pretrained(str(saved), manager=manager)
    models = [manager.loaded(key) for key in manager.keys()]
    assert not any(adapter_names(m) for m in models if isinstance(m, torch.nn.Module))
