"""Textual inversion embeddings saved with a preset: copied or pinned, hashed, and added again by from_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffblocks.blocks import Pipeline
from diffblocks.components.containment import RepositoryPathError
from diffblocks.components.textual_inversion import Embedding, added_tokens
from tests.hub_server import StandInHub
from tests.hubcache import add_cached_repo, use_hub_cache
from tests.presets.sd_fixtures import tiny_sd15

CALL = dict(height=32, width=32, num_inference_steps=2, output_type="np", progress=False)
PROMPT = "a <cat> circle, red-style"
COMMIT = "2" * 40


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd15(tmp_path_factory.mktemp("sd15") / "repo")


@pytest.fixture(scope="module")
def files(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A diffusers-layout embedding (one vector) and an A1111 one (two vectors, its token the file's stem)."""
    width = json.loads((repo / "text_encoder" / "config.json").read_text())["hidden_size"]
    folder = tmp_path_factory.mktemp("embeddings")
    g = torch.Generator().manual_seed(5)
    save_file({"<cat>": torch.randn(1, width, generator=g)}, folder / "learned_embeds.safetensors")
    save_file({"emb_params": torch.randn(2, width, generator=g)}, folder / "red-style.safetensors")
    return {"cat": folder / "learned_embeds.safetensors", "red": folder / "red-style.safetensors"}


def image(pipe: Pipeline) -> np.ndarray:
    return pipe(prompt=PROMPT, **CALL, generator=torch.Generator().manual_seed(0)).images


def entries(folder: Path) -> list[dict]:
    return json.loads((folder / "modular_model_index.json").read_text())["_diffblocks_textual_inversions"]


def test_local_embeddings_are_copied_in_and_give_the_same_image(repo: Path, files: dict[str, Path], tmp_path: Path) -> None:
    pipe = Pipeline.from_pretrained(str(repo))
    tokenizer, encoder = pipe.components["tokenizer"], pipe.components["text_encoder"]
    plain = image(pipe)
    plain_encoder = {k: v.clone() for k, v in encoder.state_dict().items()}
    plain_tokens = len(tokenizer)
    assert pipe.load_textual_inversion(files["cat"].parent) == ["<cat>"]  # a folder: learned_embeds.safetensors
    assert pipe.load_textual_inversion(files["red"]) == ["red-style", "red-style_1"]
    styled = image(pipe)
    assert not np.array_equal(styled, plain)
    table = encoder.get_input_embeddings().weight
    saved = pipe.save_pretrained(tmp_path / "saved")

    recorded = entries(saved)
    assert [(e["token"], e["repo"]) for e in recorded] == [("<cat>", None), ("red-style", None)]
    assert recorded[1]["file"] == "embeddings/red-style.safetensors" and recorded[0]["file"].startswith("embeddings/")
    assert (saved / recorded[0]["file"]).read_bytes() == files["cat"].read_bytes()
    # the tokenizer and encoder are saved as they were before the embeddings
    written = load_file(next((saved / "text_encoder").glob("*.safetensors")))
    assert written.keys() == plain_encoder.keys() and all(torch.equal(written[k], v) for k, v in plain_encoder.items())
    assert json.loads((saved / "text_encoder" / "config.json").read_text())["vocab_size"] == plain_tokens
    assert "<cat>" not in (saved / "tokenizer" / "tokenizer.json").read_text()
    # and the pipeline saved keeps them: the very matrix, the same ids
    assert encoder.get_input_embeddings().weight is table and len(tokenizer) == plain_tokens + 3
    assert np.array_equal(image(pipe), styled)

    back = Pipeline.from_pretrained(str(saved))
    assert added_tokens(back.components["tokenizer"]) == added_tokens(tokenizer)
    assert np.array_equal(image(back), styled)
    again = back.save_pretrained(tmp_path / "again")  # the loaded preset saves its embeddings again
    assert entries(again) == recorded
    back.unload_textual_inversion("<cat>")
    assert [e["token"] for e in entries(back.save_pretrained(tmp_path / "fewer"))] == ["red-style"]


def test_a_changed_file_a_path_out_or_a_bad_entry_is_refused(repo: Path, files: dict[str, Path], tmp_path: Path) -> None:
    pipe = Pipeline.from_pretrained(str(repo))
    pipe.load_textual_inversion(files["red"])
    saved = pipe.save_pretrained(tmp_path / "saved")
    index = saved / "modular_model_index.json"
    data = json.loads(index.read_text())

    (saved / "embeddings/red-style.safetensors").write_bytes(files["cat"].read_bytes())
    with pytest.raises(ValueError, match=r"red-style\.safetensors: its sha256 is .* for textual inversion 'red-style'"):
        Pipeline.from_pretrained(str(saved))
    data["_diffblocks_textual_inversions"][0]["file"] = "../outside.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(RepositoryPathError, match="names '../outside.safetensors'"):
        Pipeline.from_pretrained(str(saved))
    data["_diffblocks_textual_inversions"][0] |= {"file": "embeddings/red-style.safetensors", "repo": str(tmp_path)}
    index.write_text(json.dumps(data))
    with pytest.raises(RepositoryPathError, match="as the textual inversion's repository, which is not a Hub id"):
        Pipeline.from_pretrained(str(saved))
    data["_diffblocks_textual_inversions"][0] |= {"repo": None, "token": ""}
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="is not a list of textual inversion references"):
        Pipeline.from_pretrained(str(saved))


def test_an_embedding_without_a_file_or_from_a_pickle_cannot_be_saved(repo: Path, files: dict[str, Path], tmp_path: Path) -> None:
    pipe = Pipeline.from_pretrained(str(repo))
    pipe.add_textual_inversion(Embedding.from_file(files["cat"], token="<made>"))
    with pytest.raises(ValueError, match="textual inversion '<made>' was added from tensors"):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    pipe.unload_textual_inversion()
    pickle = tmp_path / "old.pt"
    torch.save(load_file(files["cat"]), pickle)
    pipe.load_textual_inversion(pickle, allow_pickle=True)
    with pytest.raises(ValueError, match="was read from the pickle .*old.pt; a saved preset holds safetensors"):
        pipe.save_pretrained(tmp_path / "saved")


def test_a_hub_embedding_stays_a_pinned_reference_and_push_to_hub_round_trips(
    repo: Path, files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    cache = use_hub_cache(monkeypatch, tmp_path / "cache")
    source = tmp_path / "hub_embedding"
    source.mkdir()
    (source / "red.safetensors").write_bytes(files["red"].read_bytes())
    add_cached_repo(cache, "someone/red-style", source, commit=COMMIT)
    pipe = Pipeline.from_pretrained(str(repo))
    pipe.load_textual_inversion(files["cat"])
    pipe.load_textual_inversion("someone/red-style", "red-style", weight_name="red.safetensors")
    expected = image(pipe)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with StandInHub(lifetime=120) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        info = pipe.push_to_hub("me/tiny-sd15-embeddings", token="test-token")
    exported = tmp_path / "exported"
    commit = hub.export("me/tiny-sd15-embeddings", exported)
    recorded = entries(exported)
    assert commit == info.oid and (exported / recorded[0]["file"]).is_file()
    assert [(e["token"], e["file"], e["repo"], e["revision"]) for e in recorded][1:] == [
        ("red-style", "red.safetensors", "someone/red-style", COMMIT)
    ]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_cached_repo(cache, "me/tiny-sd15-embeddings", exported, commit=commit)
    back = Pipeline.from_pretrained("me/tiny-sd15-embeddings")
    assert np.array_equal(image(back), expected)


def test_an_sdxl_pair_is_one_entry_and_both_encoders_get_it_back(tmp_path: Path) -> None:
    from tests.presets.sd_fixtures import tiny_sdxl

    repo = tiny_sdxl(tmp_path / "sdxl")
    widths = [json.loads((repo / name / "config.json").read_text())["hidden_size"] for name in ("text_encoder", "text_encoder_2")]
    g = torch.Generator().manual_seed(6)
    save_file({"clip_l": torch.randn(1, widths[0], generator=g), "clip_g": torch.randn(1, widths[1], generator=g)}, tmp_path / "zqxpair.safetensors")
    pipe = Pipeline.from_pretrained(str(repo))
    pipe.load_textual_inversion(tmp_path / "zqxpair.safetensors")
    call = dict(prompt="a zqxpair circle", **CALL)
    expected = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    saved = pipe.save_pretrained(tmp_path / "saved")
    assert [(e["token"], e["file"]) for e in entries(saved)] == [("zqxpair", "embeddings/zqxpair.safetensors")]
    back = Pipeline.from_pretrained(str(saved))
    assert all("zqxpair" in added_tokens(back.components[name]) for name in ("tokenizer", "tokenizer_2"))
    assert np.array_equal(back(**call, generator=torch.Generator().manual_seed(0)).images, expected)


def test_an_index_that_fails_half_way_leaves_shared_tokenizers_as_they_were(
    repo: Path, files: dict[str, Path], tmp_path: Path
) -> None:
    from diffblocks.components import ComponentsManager

    pipe = Pipeline.from_pretrained(str(repo))
    pipe.load_textual_inversion(files["cat"])
    pipe.load_textual_inversion(files["red"])
    saved = pipe.save_pretrained(tmp_path / "saved")
    index = saved / "modular_model_index.json"
    data = json.loads(index.read_text())
    data["_diffblocks_textual_inversions"][1]["token"] = "<cat>"  # the second file under the first one's token
    index.write_text(json.dumps(data))
    manager = ComponentsManager()
    with pytest.raises(ValueError, match=r"token '<cat>' is already in the vocabulary"):
        Pipeline.from_pretrained(str(saved), manager=manager)
    tokenizers = [manager.loaded(key) for key in manager.keys() if "CLIPTokenizer" in key]
    assert tokenizers and all(t is not None and added_tokens(t) == {} for t in tokenizers)
