"""The package's face: ``import diffblocks`` is light and gives the names users reach for first."""

from __future__ import annotations

import subprocess
import sys

import pytest

import diffblocks
from diffblocks.blocks import Block, BlockIO, Branch, Loop, Pipeline, Sequence, Switch
from diffblocks.components import ComponentsManager
from diffblocks.components.devices import default_device
from diffblocks.presets import from_pretrained


def test_the_first_names_are_the_same_objects_as_their_homes() -> None:
    homes = {
        "Pipeline": Pipeline,
        "ComponentsManager": ComponentsManager,
        "Block": Block,
        "BlockIO": BlockIO,
        "Sequence": Sequence,
        "Loop": Loop,
        "Switch": Switch,
        "Branch": Branch,
        "from_pretrained": from_pretrained,
        "default_device": default_device,
    }
    assert {name: getattr(diffblocks, name) for name in homes} == homes
    assert set(homes) <= set(diffblocks.__all__) <= set(dir(diffblocks))
    with pytest.raises(AttributeError, match="has no attribute 'Pipe'"):
        _ = diffblocks.Pipe  # type: ignore[attr-defined]


def _modules_after(code: str) -> set[str]:
    """Top-level modules and diffblocks submodules imported by ``code`` in a fresh interpreter."""
    script = f"import sys\n{code}\nprint(' '.join(sys.modules))"
    printed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return {m if m.startswith("diffblocks.") else m.split(".")[0] for m in printed.split()}


def test_import_diffblocks_loads_no_torch_and_no_submodule() -> None:
    loaded = _modules_after("import diffblocks")
    assert not loaded & {"torch", "diffusers", "transformers", "numpy", "pydantic"}
    assert {m for m in loaded if m.startswith("diffblocks.")} == {"diffblocks._version"}


def test_a_name_loads_only_its_own_layer() -> None:
    loaded = _modules_after("import diffblocks\ndiffblocks.Pipeline")
    assert "torch" in loaded and "diffblocks.blocks.pipeline" in loaded
    assert not {m for m in loaded if m.startswith("diffblocks.presets")}
    assert "diffusers" not in loaded
