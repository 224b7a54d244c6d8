"""Pipeline formats: the blocks layer finds how to read and write pipelines by name, in the registry."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from diffblocks.blocks import Pipeline, Sequence
from diffblocks.blocks import pipeline as pipeline_module
from diffblocks.blocks.formats import AbstractPipelineFormat, pipeline_format
from diffblocks.registry import DIFFUSERS_FORMAT, FORMATS, Registry, RegistryError
from tests.core.toy import SetTimesteps


class _Recording(AbstractPipelineFormat):
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def load(self, path_or_repo: str | os.PathLike[str], **options: Any) -> Pipeline:
        self.calls.append(("load", (path_or_repo, options)))
        return Pipeline(Sequence(SetTimesteps(), name="toy"))

    def save(self, pipe: Pipeline, folder: str | os.PathLike[str], **options: Any) -> Path:
        self.calls.append(("save", (pipe.name, folder, options)))
        return Path(folder)

    def push(self, pipe: Pipeline, repo_id: str, **options: Any) -> Any:
        self.calls.append(("push", (pipe.name, repo_id, options)))
        return "commit"


def test_the_built_in_format_is_the_presets_diffusers_layout() -> None:
    from diffblocks.presets.format import DiffusersFormat

    assert FORMATS.resolve(DIFFUSERS_FORMAT) is DiffusersFormat
    assert isinstance(pipeline_format(), DiffusersFormat)


def test_pipeline_methods_go_through_the_format(monkeypatch: pytest.MonkeyPatch) -> None:
    recording = _Recording()
    monkeypatch.setattr(pipeline_module, "pipeline_format", lambda: recording)
    pipe = Pipeline.from_pretrained("org/model", dtype=torch.float16)
    assert pipe.save_pretrained("folder", variant="fp16") == Path("folder")
    assert pipe.push_to_hub("me/model", private=True) == "commit"
    assert recording.calls == [
        ("load", ("org/model", {"dtype": torch.float16})),
        ("save", (pipe.name, "folder", {"variant": "fp16"})),
        ("push", (pipe.name, "me/model", {"private": True})),
    ]


def test_a_format_is_registered_by_name_and_checked() -> None:
    registry = Registry("pipeline format", entry_point_group=None)
    registry.register(("mylib", "Recording"), _Recording)
    registry.register(("mylib", "NotAFormat"), "collections:OrderedDict")
    assert isinstance(pipeline_format(("mylib", "Recording"), registry=registry), _Recording)
    with pytest.raises(RegistryError, match="NotAFormat is collections.OrderedDict, which is not an AbstractPipelineFormat"):
        pipeline_format(("mylib", "NotAFormat"), registry=registry)
    with pytest.raises(RegistryError, match="pipeline format mylib.Missing is not allowed"):
        pipeline_format(("mylib", "Missing"), registry=registry)
