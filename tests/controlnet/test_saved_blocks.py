"""ControlNet blocks in saved block trees: an edited ControlNet pipeline saves them by name and loads back, no code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from diffblocks.blocks import Pipeline
from diffblocks.blocks.tree import walk
from diffblocks.components.models.controlnet import ControlNetModel, FluxControlNetModel
from diffblocks.presets.controlnet import with_controlnet
from diffblocks.presets.flux_controlnet import flux_controlnet_blocks
from diffblocks.presets.structure import tree_rows
from diffblocks.registry import BLOCKS
from tests.controlnet.flux_fixtures import tiny_flux_controlnet
from tests.controlnet.test_controlnet import SD15_NET, SIZE, control_image, tiny_controlnet
from tests.presets.flux_fixtures import tiny_flux
from tests.presets.sd_fixtures import tiny_sd15

CONTROL_BLOCKS = {"PrepareControlImage", "PredictControlledNoise", "PrepareFluxControlImage", "PredictControlledFlow"}


def saved_leaves(folder: Path) -> set[tuple[str, str]]:
    """The ``[library, class]`` of every registry leaf of a saved tree; fails if any leaf was saved as code."""
    index = json.loads((folder / "modular_model_index.json").read_text())
    assert "_diffblocks_code" not in index and not (folder / "blocks").exists()
    leaves: set[tuple[str, str]] = set()

    def visit(node: dict) -> None:
        if "block" in node:
            leaves.add(tuple(node["block"]))
        for child in node.get("sequence", node.get("loop", [])):
            visit(child)
        for branch in node.get("switch", []):
            visit(branch["block"])

    visit(index["_diffblocks_blocks"])
    return leaves


def image(pipe: Pipeline, **kwargs: object) -> np.ndarray:
    return pipe(**kwargs, control_image=control_image(), generator=torch.Generator().manual_seed(0), output_type="np",
                progress=False).images  # fmt: skip


def test_every_controlnet_block_is_in_the_block_registry() -> None:
    for name in CONTROL_BLOCKS:
        assert BLOCKS.resolve(("diffblocks", name)).__name__ == name


def test_an_edited_sd15_controlnet_pipeline_saves_its_blocks_by_name_and_loads_back(tmp_path: Path) -> None:
    repo, net = tiny_sd15(tmp_path / "base"), tiny_controlnet(tmp_path / "net", **SD15_NET)
    pipe = with_controlnet(Pipeline.from_pretrained(str(repo)), ControlNetModel.from_pretrained(net))
    pipe.remove_block("workflow.inpaint.denoise.blend")  # an edit: the tree differs from the family's, so it is saved
    folder = pipe.save_pretrained(tmp_path / "edited")
    assert {("diffblocks", "PrepareControlImage"), ("diffblocks", "PredictControlledNoise")} <= saved_leaves(folder)

    back = Pipeline.from_pretrained(str(folder))  # no trust_remote_code: the blocks come from the allowlist
    assert tree_rows(back.blocks) == tree_rows(pipe.blocks)
    kwargs = dict(prompt="a red circle", height=SIZE, width=SIZE, num_inference_steps=3, controlnet_conditioning_scale=0.7)
    assert np.array_equal(image(back, **kwargs), image(pipe, **kwargs))


def test_an_edited_flux_controlnet_pipeline_saves_its_blocks_by_name_and_loads_back(tmp_path: Path) -> None:
    repo, net = tiny_flux(tmp_path / "base"), tiny_flux_controlnet(tmp_path / "net")
    base = Pipeline.from_pretrained(str(repo))
    # the ControlNet blocks put by hand into the flux preset: its tree is not the family's, so it is saved
    pipe = Pipeline(flux_controlnet_blocks(base.blocks), {**base.components, "controlnet": FluxControlNetModel.from_pretrained(net)},
                    preset=base.preset)  # fmt: skip
    assert pipe.preset is not None and pipe.preset.family == "flux"
    folder = pipe.save_pretrained(tmp_path / "edited")
    assert {("diffblocks", "PrepareFluxControlImage"), ("diffblocks", "PredictControlledFlow")} <= saved_leaves(folder)

    back = Pipeline.from_pretrained(str(folder))
    assert [n.path for n in walk(back.blocks)] == [n.path for n in walk(pipe.blocks)]
    kwargs = dict(prompt="a red circle", height=SIZE, width=SIZE, num_inference_steps=2, max_sequence_length=16)
    assert np.array_equal(image(back, **kwargs), image(pipe, **kwargs))
