"""Modular Diffusers' format, both ways: folders diffusers' ModularPipeline saves load here, and ours load there.

diffusers is the reference: the same folder, the same seed, the same image (SDXL and Flux, the
families diffusers has a ModularPipeline for). Repositories that carry diffusers' own custom block
code are refused, with what to do instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.components.guiders import ClassifierFreeGuidance
from diffblocks.presets.remote_code import RemoteCodeError
from tests.hubcache import add_cached_repo, use_hub_cache
from tests.presets.flux_fixtures import tiny_flux
from tests.presets.sd_fixtures import tiny_sdxl

SDXL_CALL = dict(prompt="a red circle", negative_prompt="blurry", height=32, width=32, num_inference_steps=3)
FLUX_CALL = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=16)
SDXL_COMPONENTS = ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler", "guider"]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classic")
    return {"sdxl": tiny_sdxl(root / "sdxl"), "flux": tiny_flux(root / "flux")}


def ours_image(pipe: Pipeline, family: str) -> np.ndarray:
    call, seed = (SDXL_CALL, 0) if family == "sdxl" else (FLUX_CALL, 7)
    return pipe(**call, generator=torch.Generator().manual_seed(seed), output_type="np", progress=False).images


def diffusers_image(pipe: Any, family: str) -> np.ndarray:
    call, seed = (SDXL_CALL, 0) if family == "sdxl" else (FLUX_CALL, 7)
    return np.asarray(pipe(**call, generator=torch.Generator().manual_seed(seed), output="images", output_type="np"))


def modular_pipeline(folder: Path, family: str) -> Any:
    """diffusers' ModularPipeline for ``folder``, its components loaded."""
    from diffusers import ModularPipeline

    pipe = ModularPipeline.from_pretrained(str(folder))
    # SDXL's blocks also list optional components (IP-Adapter, ControlNet) that these folders do not have
    pipe.load_components(names=SDXL_COMPONENTS) if family == "sdxl" else pipe.load_components()
    return pipe


def index_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "modular_model_index.json").read_text())


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_folders_saved_by_diffusers_modular_pipeline_load_here(
    family: str, repos: dict[str, Path], tmp_path: Path
) -> None:
    from diffusers import ComponentSpec
    from diffusers.guiders import ClassifierFreeGuidance as DiffusersCFG

    reference = modular_pipeline(repos[family], family)
    if family == "sdxl":  # a guider loaded from a repository is saved in its own subfolder
        DiffusersCFG(guidance_scale=6.5).save_pretrained(tmp_path / "guiders" / "guider")
        spec = ComponentSpec(
            name="guider", type_hint=DiffusersCFG, pretrained_model_name_or_path=str(tmp_path / "guiders"), subfolder="guider"
        )
        reference.update_components(guider=spec.load())
    folder = tmp_path / "modular"
    reference.save_pretrained(str(folder), overwrite_modular_index=True)
    index = index_of(folder)
    assert index["_class_name"] == {"sdxl": "StableDiffusionXLModularPipeline", "flux": "FluxModularPipeline"}[family]
    assert index["vae"][2]["pretrained_model_name_or_path"] == str(folder)  # diffusers names the folder it saved into
    if family == "sdxl":
        assert index["guider"][:2] == ["diffusers", "ClassifierFreeGuidance"] and index["guider"][2]["subfolder"] == "guider"

    ours = Pipeline.from_pretrained(str(folder))
    assert ours.preset is not None and ours.preset.family == family
    if family == "sdxl":
        assert ours.components["guider"] == ClassifierFreeGuidance(guidance_scale=6.5)  # read from guider/
    diff = np.abs(ours_image(ours, family) - diffusers_image(reference, family)).max()
    assert diff < TOLERANCE  # measured: 9.8e-7 (SDXL), 1.1e-6 (Flux)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_our_folders_load_in_diffusers_modular_and_classic_pipelines(
    family: str, repos: dict[str, Path], tmp_path: Path
) -> None:
    from diffusers import DiffusionPipeline

    ours = Pipeline.from_pretrained(str(repos[family]))
    if family == "sdxl":
        ours.update_components(guider=ClassifierFreeGuidance(guidance_scale=6.5))
    folder = ours.save_pretrained(tmp_path / "saved")
    index = index_of(folder)
    modular, blocks = {"sdxl": ("StableDiffusionXLModularPipeline", "StableDiffusionXLAutoBlocks"),
                       "flux": ("FluxModularPipeline", "FluxAutoBlocks")}[family]
    assert (index["_class_name"], index["_blocks_class_name"]) == (modular, blocks)
    assert all("dtype" not in entry[2] for entry in index.values() if isinstance(entry, list))  # diffusers takes none
    classic_class = {"sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}[family]
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == classic_class
    expected = ours_image(ours, family)

    reference = modular_pipeline(folder, family)
    assert type(reference).__name__ == modular
    if family == "sdxl":
        assert reference.guider.guidance_scale == 6.5  # our guider subfolder, read by diffusers
    assert np.abs(expected - diffusers_image(reference, family)).max() < TOLERANCE  # measured: 1.3e-6, 1.1e-6

    classic = DiffusionPipeline.from_pretrained(str(folder))  # reads model_index.json, as before
    classic.set_progress_bar_config(disable=True)
    assert type(classic).__name__ == classic_class
    if family == "sdxl":
        call = dict(SDXL_CALL, guidance_scale=6.5)
        images = classic(**call, generator=torch.Generator().manual_seed(0), output_type="np").images
        assert np.abs(expected - images).max() < TOLERANCE  # measured: 0.0

    # and our own loader still reads it, modular class name and all
    assert np.array_equal(ours_image(Pipeline.from_pretrained(str(folder)), family), expected)


def diffusers_custom_blocks(folder: Path) -> None:
    """What diffusers' ModularPipelineBlocks.save_pretrained writes for a custom block, with a pipeline index."""
    folder.mkdir(parents=True)
    (folder / "my_block.py").write_text("raise SystemExit('this code must never run')\n")
    config = {"_class_name": "MyBlock", "auto_map": {"ModularPipelineBlocks": "my_block.MyBlock"}}
    (folder / "modular_config.json").write_text(json.dumps(config))
    index = {"_class_name": "StableDiffusionXLModularPipeline", "_blocks_class_name": "MyBlock"}
    (folder / "modular_model_index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("where", ["local", "hub-cache"])
def test_diffusers_custom_block_code_is_refused(where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    diffusers_custom_blocks(tmp_path / "custom")
    name = str(tmp_path / "custom")
    if where == "hub-cache":
        add_cached_repo(use_hub_cache(monkeypatch, tmp_path / "cache"), "someone/custom-block", tmp_path / "custom")
        name = "someone/custom-block"
    for trust in (False, True):
        with pytest.raises(RemoteCodeError, match=r"carries diffusers' own custom block code \(my_block\.py, .*"
                           r"modular_config\.json\)\. diffblocks does not run diffusers' block code.*docs/publishing\.md"):
            Pipeline.from_pretrained(name, trust_remote_code=trust)
