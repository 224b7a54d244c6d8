"""Research blocks travel with their preset: edited trees save and load back, user code only when trusted.

The user-written block lives in ``tests/presets/research/offset_noise.py``, a module file as a
researcher would write it. Loading checks trust, the pinned revision and every file's sha256 before
anything is imported, and imports under a namespace private to the repository and revision.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.blocks.standard import SchedulerStep
from diffblocks.blocks.tree import walk
from diffblocks.components.containment import RepositoryPathError
from diffblocks.presets import loading, saving
from diffblocks.presets.remote_code import ENV_NO_REMOTE_CODE, NAMESPACE, RemoteCodeError
from diffblocks.presets.structure import tree_rows
from diffblocks.registry import RegistryError, default_block_registry
from diffblocks.registry import registry as registry_module
from tests.hub_server import StandInHub
from tests.hubcache import add_cached_repo, use_hub_cache
from tests.presets.research.offset_noise import OffsetNoise
from tests.presets.sd_fixtures import tiny_sd15

ROOT = Path(__file__).resolve().parents[2]
CALL = dict(
    prompt="a red circle", negative_prompt="blurry", height=32, width=32, num_inference_steps=3, output_type="np"
)
LATENTS = "workflow.text2img.prepare_latents"
CODE = "blocks/tests/presets/research/offset_noise.py"
COMMIT = "a" * 40


@pytest.fixture(scope="module")
def sd15_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd15(tmp_path_factory.mktemp("sd15") / "repo")


@pytest.fixture(scope="module")
def research(sd15_repo: Path) -> Pipeline:
    """The preset with the user-written OffsetNoise in place of its starting noise."""
    return Pipeline.from_pretrained(str(sd15_repo)).replace_block(LATENTS, OffsetNoise(offset=0.5))


@pytest.fixture(scope="module")
def saved(research: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return research.save_pretrained(tmp_path_factory.mktemp("saved") / "research")


def image(pipe: Pipeline) -> np.ndarray:
    return pipe(**CALL, generator=torch.Generator().manual_seed(0), progress=False).images


def index_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "modular_model_index.json").read_text())


def rewrite_index(folder: Path, change: Any) -> None:
    index = index_of(folder)
    change(index)
    (folder / "modular_model_index.json").write_text(json.dumps(index))


def node_at(tree: dict[str, Any], path: str) -> dict[str, Any]:
    """The saved tree's node at a dotted path (a switch's children by branch name)."""
    node = tree
    for key in path.split("."):
        if "switch" in node:
            node = next(b["block"] for b in node["switch"] if b["branch"] == key)
        else:
            node = next(child for child in node.get("sequence", node.get("loop", [])) if child["name"] == key)
    return node


def private_modules() -> set[str]:
    return {name for name in sys.modules if name.startswith(NAMESPACE)}


def test_an_unedited_preset_saves_no_tree(sd15_repo: Path, tmp_path: Path) -> None:
    folder = Pipeline.from_pretrained(str(sd15_repo)).save_pretrained(tmp_path / "plain")
    assert "_diffblocks_blocks" not in index_of(folder) and not (folder / "blocks").exists()


def test_blocks_inserted_and_removed_save_and_load_back(sd15_repo: Path, tmp_path: Path) -> None:
    plain = Pipeline.from_pretrained(str(sd15_repo))
    pipe = Pipeline.from_pretrained(str(sd15_repo))
    pipe.insert_block(SchedulerStep(name="step_twice"), after="workflow.text2img.denoise.step")
    pipe.remove_block("workflow.inpaint.denoise.blend")
    folder = pipe.save_pretrained(tmp_path / "edited")
    assert "_diffblocks_code" not in index_of(folder)  # built-in blocks only: named, no code

    back = Pipeline.from_pretrained(str(folder))  # no code to trust
    assert tree_rows(back.blocks) == tree_rows(pipe.blocks) != tree_rows(plain.blocks)
    assert np.array_equal(image(back), image(pipe)) and not np.array_equal(image(back), image(plain))


def test_user_block_saves_its_module_and_loads_back_when_trusted(
    research: Pipeline, saved: Path, tmp_path: Path
) -> None:
    index = index_of(saved)
    assert index["_diffblocks_code"] == {CODE: hashlib.sha256((saved / CODE).read_bytes()).hexdigest()}
    assert (saved / CODE).read_bytes() == (ROOT / "tests/presets/research/offset_noise.py").read_bytes()
    tree = index["_diffblocks_blocks"]
    leaf = {"name": "prepare_latents", "code": CODE, "class": "OffsetNoise", "config": {"offset": 0.5}}
    assert node_at(tree, LATENTS) == leaf
    assert node_at(tree, "decode_images") == {"name": "decode_images", "block": ["diffblocks", "DecodeImages"], "config": {}}
    assert "_diffblocks_blocks" not in json.loads((saved / "model_index.json").read_text())

    before = private_modules()
    with pytest.raises(RemoteCodeError, match=rf"carries block code .*{CODE} \(sha256 [0-9a-f]{{12}}.*trust_remote_code=True"):
        Pipeline.from_pretrained(str(saved))
    assert private_modules() == before  # refused before anything was imported

    back = Pipeline.from_pretrained(str(saved), trust_remote_code=True)
    block = back.blocks.get(LATENTS)
    assert type(block).__name__ == "OffsetNoise" and type(block).__module__.startswith(f"{NAMESPACE}.r")
    assert type(block) is not OffsetNoise and block.config.offset == 0.5
    assert [n.path for n in walk(back.blocks)] == [n.path for n in walk(research.blocks)]
    assert np.array_equal(image(back), image(research))

    again = back.save_pretrained(tmp_path / "again")  # a loaded block keeps its file's name and bytes
    assert index_of(again)["_diffblocks_code"] == index["_diffblocks_code"]
    assert Pipeline.from_pretrained(str(saved), trust_remote_code=True).blocks.get(LATENTS).__class__ is type(block)


def test_plugin_blocks_are_saved_by_registry_name(
    sd15_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an installed package declares its block under the 'diffblocks.blocks' entry-point group
    plugin = EntryPoint("research.OffsetNoise", "tests.presets.research.offset_noise:OffsetNoise", "diffblocks.blocks")
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [plugin] if group == "diffblocks.blocks" else [])
    for module in (saving, loading):
        monkeypatch.setattr(module, "BLOCKS", default_block_registry())
    pipe = Pipeline.from_pretrained(str(sd15_repo)).replace_block(LATENTS, OffsetNoise(offset=0.25))
    folder = pipe.save_pretrained(tmp_path / "plugin")
    assert not (folder / "blocks").exists() and "_diffblocks_code" not in index_of(folder)
    assert '"block": ["research", "OffsetNoise"]' in json.dumps(index_of(folder)["_diffblocks_blocks"])

    back = Pipeline.from_pretrained(str(folder))  # registered code is installed code: no trust needed
    assert type(back.blocks.get(LATENTS)) is OffsetNoise and back.blocks.get(LATENTS).config.offset == 0.25
    assert np.array_equal(image(back), image(pipe))

    # on a machine without the package, loading says which block is missing and how to get it
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [])
    monkeypatch.setattr(loading, "BLOCKS", default_block_registry())
    with pytest.raises(RegistryError, match="block research.OffsetNoise is not allowed.*'diffblocks.blocks' entry-point"):
        Pipeline.from_pretrained(str(folder))


def test_tampered_unlisted_and_escaping_code_is_refused(saved: Path, tmp_path: Path) -> None:
    before = private_modules()
    tampered = Path(shutil.copytree(saved, tmp_path / "tampered"))
    with (tampered / CODE).open("a") as file:
        file.write("\nimport os  # added later\n")
    with pytest.raises(RemoteCodeError, match=rf"{CODE}' has sha256 [0-9a-f]{{64}}, but the index records"):
        Pipeline.from_pretrained(str(tampered), trust_remote_code=True)

    unlisted = Path(shutil.copytree(saved, tmp_path / "unlisted"))
    rewrite_index(unlisted, lambda index: index.pop("_diffblocks_code"))
    with pytest.raises(RemoteCodeError, match=rf"names the code file '{CODE}', which its index does not list"):
        Pipeline.from_pretrained(str(unlisted), trust_remote_code=True)

    outside = tmp_path / "outside.py"
    outside.write_text((saved / CODE).read_text())
    escaping = Path(shutil.copytree(saved, tmp_path / "escaping"))

    def escape(index: dict[str, Any]) -> None:
        text = json.dumps(index).replace(CODE, "../outside.py")
        index.clear()
        index.update(json.loads(text))

    rewrite_index(escaping, escape)
    with pytest.raises(RepositoryPathError, match=r"code file '\.\./outside\.py'.*'\.\.' segment"):
        Pipeline.from_pretrained(str(escaping), trust_remote_code=True)

    linked = Path(shutil.copytree(saved, tmp_path / "linked"))
    (linked / CODE).unlink()
    (linked / CODE).symlink_to(outside)  # the same bytes, outside the repository
    with pytest.raises(RepositoryPathError, match=rf"code file '{CODE}'.*symbolic link to .*outside\.py, outside"):
        Pipeline.from_pretrained(str(linked), trust_remote_code=True)
    assert private_modules() == before


def test_the_environment_switch_refuses_all_code(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_NO_REMOTE_CODE, "1")
    with pytest.raises(RemoteCodeError, match=rf"{CODE} .*DIFFBLOCKS_NO_REMOTE_CODE is set"):
        Pipeline.from_pretrained(str(saved), trust_remote_code=True)


def test_malformed_trees_name_the_file_and_the_block(saved: Path, tmp_path: Path) -> None:
    broken = Path(shutil.copytree(saved, tmp_path / "broken"))
    rewrite_index(broken, lambda index: index["_diffblocks_blocks"]["sequence"][0].update(config={"nope": 1}))
    with pytest.raises(ValueError, match=r"modular_model_index.json: the saved block tree is malformed at 'encode_prompt'"):
        Pipeline.from_pretrained(str(broken), trust_remote_code=True)
    rewrite_index(broken, lambda index: index["_diffblocks_blocks"]["sequence"][0].update(block=["os", "system"]))
    with pytest.raises(RegistryError, match="block os.system is not allowed"):
        Pipeline.from_pretrained(str(broken), trust_remote_code=True)
    extra = Path(shutil.copytree(saved, tmp_path / "extra"))
    rewrite_index(extra, lambda index: index["_diffblocks_blocks"]["sequence"].append([]))
    with pytest.raises(ValueError, match=r"malformed at '\?': each block is an object"):
        Pipeline.from_pretrained(str(extra), trust_remote_code=True)


def test_hub_code_runs_only_from_a_pinned_commit_in_a_private_namespace(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    search_path = list(sys.path)
    cache = use_hub_cache(monkeypatch, tmp_path / "cache")
    add_cached_repo(cache, "alice/research", saved, commit=COMMIT)
    for revision in (None, "main"):
        with pytest.raises(RemoteCodeError, match=rf"{CODE} .*pinned commit.*the commit you have now is '{COMMIT}'"):
            Pipeline.from_pretrained("alice/research", revision=revision, trust_remote_code=True)
    with pytest.raises(RemoteCodeError, match=r"pass trust_remote_code=True and revision='<full commit hash>'"):
        Pipeline.from_pretrained("alice/research")

    # a second repository with a module of the same path and other code: no collision
    other = tmp_path / "other"
    shutil.copytree(saved, other)
    (other / CODE).write_text((saved / CODE).read_text().replace("self.config.offset *", "-self.config.offset *"))
    digest = hashlib.sha256((other / CODE).read_bytes()).hexdigest()
    rewrite_index(other, lambda index: index["_diffblocks_code"].update({CODE: digest}))
    add_cached_repo(cache, "bob/research", other, commit="b" * 40)

    alice = Pipeline.from_pretrained("alice/research", revision=COMMIT, trust_remote_code=True)
    bob = Pipeline.from_pretrained("bob/research", revision="b" * 40, trust_remote_code=True)
    alice_cls, bob_cls = type(alice.blocks.get(LATENTS)), type(bob.blocks.get(LATENTS))
    assert alice_cls is not bob_cls and alice_cls.__module__ != bob_cls.__module__
    assert not np.array_equal(image(alice), image(bob))
    assert sys.path == search_path  # nothing added: modules are imported from their files


def test_push_then_load_in_a_clean_interpreter(
    research: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    expected = image(research)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with StandInHub(lifetime=120) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        info = research.push_to_hub("alice/offset-noise", token="test-token")
    commit = hub.export("alice/offset-noise", tmp_path / "exported")
    assert commit == info.oid and (tmp_path / "exported" / CODE).is_file()
    cache = tmp_path / "cache"
    add_cached_repo(cache, "alice/offset-noise", tmp_path / "exported", commit=commit)

    script = f"""
import sys, numpy as np, torch
from diffblocks.blocks import Pipeline
torch.set_num_threads(1)  # as the test process (tests/conftest.py), for the same bits
pipe = Pipeline.from_pretrained("alice/offset-noise", revision={commit!r}, trust_remote_code=True)
block = pipe.blocks.get({LATENTS!r})
assert type(block).__module__.startswith("{NAMESPACE}."), type(block).__module__
assert "tests.presets.research.offset_noise" not in sys.modules
call = {CALL!r}
np.save(sys.argv[1], pipe(**call, generator=torch.Generator().manual_seed(0), progress=False).images)
"""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "image.npy"
    done = subprocess.run([sys.executable, "-c", script, str(out)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert np.array_equal(np.load(out), expected)
