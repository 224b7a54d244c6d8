"""The script that makes docs/images/controlnet_canny.png runs (a smoke run: one training step, two sampling steps)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import PIL.Image

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "scripts" / "controlnet_picture.py"


def test_the_picture_script_runs(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("controlnet_picture", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--steps", "1", "--samples", "8", "--batch", "2", "--rows", "1", "--inference-steps", "2",
                       "--out", str(tmp_path / "picture.png")])  # fmt: skip
    with PIL.Image.open(out) as picture:
        assert picture.size == (68 * 4 * 2, 68 * 2)  # picture, edges, with and without the ControlNet

