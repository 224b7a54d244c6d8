"""Saving never deletes what it did not write, and a failed save leaves the previous one intact."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import diffblocks.presets.staging
from diffblocks.blocks import Pipeline
from diffblocks.components.models.autoencoder_kl import AutoencoderKL
from diffblocks.components.schedulers import DPMSolverMultistepScheduler
from diffblocks.presets.staging import MANIFEST_KEY
from tests.hubcache import add_cached_repo, use_hub_cache
from tests.presets.sd_fixtures import tiny_sd15

CALL = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, output_type="np", progress=False)
USER_FILES = {"notes.txt": b"keep me", "images/cat.png": b"\x89PNG...", ".git/HEAD": b"ref: refs/heads/main\n",
              ".git/objects/ab/cdef": b"blob", "unet/why-this-unet.md": b"trained on ..."}


@pytest.fixture(scope="module")
def sd15_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd15(tmp_path_factory.mktemp("sd15") / "repo")


@pytest.fixture
def pipe(sd15_repo: Path) -> Pipeline:
    return Pipeline.from_pretrained(str(sd15_repo))


def listing(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def add_user_files(folder: Path) -> None:
    for name, content in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)


def user_files_intact(folder: Path) -> bool:
    return all((folder / name).read_bytes() == content for name, content in USER_FILES.items())


def image(pipe: Pipeline) -> np.ndarray:
    return pipe(**CALL, generator=torch.Generator().manual_seed(0)).images


def test_saving_twice_keeps_the_users_files_and_drops_the_previous_saves(pipe: Pipeline, tmp_path: Path) -> None:
    folder = pipe.save_pretrained(tmp_path / "saved", max_shard_size="1MB")
    add_user_files(folder)
    sharded = sorted(p.name for p in (folder / "unet").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in sharded

    pipe.save_pretrained(folder)  # unsharded now: the shards and their index must go, or they would be loaded
    assert user_files_intact(folder)
    assert sorted(p.name for p in (folder / "unet").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "why-this-unet.md",
    ]
    written = json.loads((folder / "modular_model_index.json").read_text())[MANIFEST_KEY]
    assert set(written) == set(listing(folder)) - set(USER_FILES)
    assert np.array_equal(image(Pipeline.from_pretrained(str(folder))), image(pipe))

    # the same save again changes nothing; no hidden folders are left beside it
    before = listing(folder)
    Pipeline.from_pretrained(str(folder)).save_pretrained(folder)
    assert listing(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_components_saved_as_references_leave_their_old_folders(
    pipe: Pipeline, sd15_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = pipe.save_pretrained(tmp_path / "saved")
    add_user_files(folder)
    add_cached_repo(use_hub_cache(monkeypatch, tmp_path / "cache"), "org/tiny-sd15", sd15_repo)
    Pipeline.from_pretrained("org/tiny-sd15").save_pretrained(folder)  # every component a Hub reference now
    assert set(listing(folder)) == {"guider/guider_config.json", "modular_model_index.json", *USER_FILES}


def test_a_save_from_before_the_file_list(pipe: Pipeline, tmp_path: Path) -> None:
    folder = pipe.save_pretrained(tmp_path / "saved", max_shard_size="1MB")
    index = json.loads((folder / "modular_model_index.json").read_text())
    del index[MANIFEST_KEY]
    (folder / "modular_model_index.json").write_text(json.dumps(index))
    (folder / "notes.txt").write_text("keep me")
    pipe.save_pretrained(folder)
    assert (folder / "notes.txt").read_text() == "keep me"
    assert not list((folder / "unet").glob("*-of-*.safetensors"))  # its component folders were its own


def test_a_forged_file_list_deletes_nothing_outside_the_save(pipe: Pipeline, tmp_path: Path) -> None:
    folder = pipe.save_pretrained(tmp_path / "saved")
    add_user_files(folder)
    (tmp_path / "outside.txt").write_text("keep me")
    (folder / "linked").symlink_to(tmp_path, target_is_directory=True)
    index = json.loads((folder / "modular_model_index.json").read_text())
    index[MANIFEST_KEY] += [".git/HEAD", "../outside.txt", str(tmp_path / "outside.txt"), "linked/outside.txt"]
    (folder / "modular_model_index.json").write_text(json.dumps(index))
    pipe.save_pretrained(folder)
    assert user_files_intact(folder) and (tmp_path / "outside.txt").read_text() == "keep me"


def test_a_failed_save_leaves_the_previous_one_intact(
    pipe: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = pipe.save_pretrained(tmp_path / "saved", max_shard_size="1MB")
    add_user_files(folder)
    before = listing(folder)
    pipe.update_components(scheduler=DPMSolverMultistepScheduler.from_config(pipe.components["scheduler"].to_config()))

    def broken(self: AutoencoderKL, folder: Path, **options: Any) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as patch:  # fails while writing
        patch.setattr(AutoencoderKL, "save_pretrained", broken)
        with pytest.raises(OSError, match="disk full"):
            pipe.save_pretrained(folder)
    assert listing(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]

    moved_in: list[Any] = []
    replace = os.replace

    def fails_midway(source: Any, destination: Any) -> None:
        if ".saved.saving-" in str(source) and Path(destination).is_relative_to(folder):
            moved_in.append(destination)
            if len(moved_in) == 3:  # the old files went aside, and two new ones came in
                raise OSError("device busy")
        replace(source, destination)

    with monkeypatch.context() as patch:  # fails while moving into place
        patch.setattr(diffblocks.presets.staging.os, "replace", fails_midway)
        with pytest.raises(OSError, match="device busy"):
            pipe.save_pretrained(folder)
    assert len(moved_in) == 3 and listing(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_linked_target_is_written_through(pipe: Pipeline, tmp_path: Path) -> None:
    real = pipe.save_pretrained(tmp_path / "real")
    add_user_files(real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    pipe.save_pretrained(link)
    assert link.is_symlink() and link.resolve() == real.resolve() and user_files_intact(real)
    assert np.array_equal(image(Pipeline.from_pretrained(str(link))), image(pipe))

    broken = tmp_path / "broken"
    broken.symlink_to(tmp_path / "nowhere", target_is_directory=True)
    with pytest.raises(FileExistsError, match="which does not exist"):
        pipe.save_pretrained(broken)

    # a link inside the folder where the save writes would be written through: refused, nothing changed
    elsewhere = pipe.save_pretrained(tmp_path / "elsewhere")
    (real / "unet").rename(tmp_path / "unet-moved")
    (real / "unet").symlink_to(elsewhere / "unet", target_is_directory=True)
    before, theirs = listing(real), listing(elsewhere)
    with pytest.raises(FileExistsError, match=r"unet is a symbolic link to .*elsewhere/unet; saving would write through it"):
        pipe.save_pretrained(real)
    assert listing(real) == before and listing(elsewhere) == theirs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "elsewhere", "link", "real", "unet-moved"]
