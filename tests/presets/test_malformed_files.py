"""Malformed JSON and checkpoints in a repository fail when read, naming the file and what it should hold."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffblocks.blocks import Pipeline
from diffblocks.components.config_files import MAX_JSON_DEPTH, ConfigFileError, read_json_object
from diffblocks.components.models.loading import CheckpointError
from tests.presets.sd_fixtures import tiny_sd15

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def clean_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd15(tmp_path_factory.mktemp("sd15") / "repo")


@pytest.fixture
def repo(clean_repo: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(clean_repo, tmp_path / "repo"))


def _write(relative: str, text: str) -> Callable[[Path], None]:
    return lambda repo: (repo / relative).write_text(text)


def _entry(value: object) -> Callable[[Path], None]:
    def change(repo: Path) -> None:
        index = json.loads((repo / "model_index.json").read_text())
        (repo / "model_index.json").write_text(json.dumps({**index, "unet": value}))

    return change


CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("index-truncated", _write("model_index.json", '{"_class_name": "StableDiffusionPipeline", "unet": ['), r"model_index\.json is not valid JSON: .* at line 1, column"),
    ("index-list", _write("model_index.json", "[1, 2]"), r"model_index\.json holds a JSON list, not an object; it should hold a pipeline index"),
    ("index-deep", _write("model_index.json", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"), r"model_index\.json nests lists or objects (too deeply|more than)"),
    ("index-binary", lambda repo: (repo / "model_index.json").write_bytes(b"\xff\xfe{}"), r"model_index\.json is not UTF-8 text"),
    ("entry-number", _entry([1, 2]), r"model_index\.json of .*: entry 'unet' is malformed"),
    ("entry-spec-list", _entry(["diffusers", "UNet2DConditionModel", ["unet"]]), r"entry 'unet' is malformed"),
    ("entry-subfolder-number", _entry(["diffusers", "UNet2DConditionModel", {"subfolder": 7}]), r"entry 'unet' is malformed"),
    ("model-config-string", _write("unet/config.json", '"unet"'), r"unet/config\.json holds a JSON string, not an object; it should hold a model config"),
    ("scheduler-config-bad", _write("scheduler/scheduler_config.json", "{'single': 'quotes'}"), r"scheduler_config\.json is not valid JSON"),
]


@pytest.mark.parametrize(("change", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_json_names_the_file(repo: Path, change: Callable[[Path], None], message: str) -> None:
    change(repo)
    with pytest.raises(ConfigFileError, match=message):
        Pipeline.from_pretrained(str(repo)).components  # noqa: B018 - loading is the test


def test_nesting_below_the_recursion_limit_is_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"a": ' + "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1) + "}")
    with pytest.raises(ConfigFileError, match=rf"nests lists or objects more than {MAX_JSON_DEPTH} levels deep"):
        read_json_object(path)


def test_a_weight_index_that_is_not_an_object_names_the_file(repo: Path) -> None:
    (repo / "unet" / f"{WEIGHTS}.index.json").write_text('{"weight_map": ["a", "b"]}')
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors\.index\.json: weight_map is a JSON list"):
        Pipeline.from_pretrained(str(repo)).components  # noqa: B018


def test_a_config_value_the_model_refuses_names_the_file(repo: Path) -> None:
    config = json.loads((repo / "unet" / "config.json").read_text())
    (repo / "unet" / "config.json").write_text(json.dumps({**config, "layers_per_block": "two"}))
    with pytest.raises(ValueError, match="layers_per_block") as caught:
        Pipeline.from_pretrained(str(repo)).components  # noqa: B018
    assert any("unet/config.json" in note for note in getattr(caught.value, "__notes__", []))


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64])
def test_weights_of_another_kind_than_the_models_are_refused_before_loading(repo: Path, dtype: torch.dtype) -> None:
    weights = load_file(str(repo / "unet" / WEIGHTS))
    weights["conv_in.weight"] = weights["conv_in.weight"].to(dtype)
    save_file(weights, str(repo / "unet" / WEIGHTS))
    with pytest.raises(CheckpointError, match=r"have dtypes UNet2DConditionModel cannot use: conv_in\.weight .*the model's is torch\.float32"):
        Pipeline.from_pretrained(str(repo)).components  # noqa: B018


def test_float_weights_of_another_width_still_load(repo: Path) -> None:
    weights = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(repo / "unet" / WEIGHTS)).items()}
    save_file(weights, str(repo / "unet" / WEIGHTS))
    unet = Pipeline.from_pretrained(str(repo)).components["unet"]
    assert next(unet.parameters()).dtype == torch.float32
