"""Batch rows, the manifest and the refusals that come before any Ray work (no cluster needed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffblocks.cli import main
from diffblocks.scale import generate_batch
from diffblocks.scale.manifest import Manifest, error_record, image_records
from diffblocks.scale.rows import read_rows


def test_a_text_file_is_a_prompt_per_line_and_row_k_gets_the_base_seed_plus_k(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("a red circle\n\n  a blue square  \na green ring\n")
    rows = read_rows(path, {"seed": 10, "num_inference_steps": 3})
    assert [(row.index, row.prompt) for row in rows] == [(0, "a red circle"), (1, "a blue square"), (2, "a green ring")]
    assert [row.request.seed for row in rows if row.request] == [10, 11, 12]
    assert {row.request.num_inference_steps for row in rows if row.request} == {3}


def test_json_lines_and_parquet_rows_override_the_defaults_and_null_means_default(tmp_path: Path) -> None:
    rows = [
        {"prompt": "a red circle", "seed": 7, "num_images": 2},
        {"prompt": "a blue square", "height": 32, "width": None, "guider": "AdaptiveProjectedGuidance"},
    ]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    parquet = tmp_path / "p.parquet"
    columns = sorted({name for row in rows for name in row})
    pq.write_table(pa.table({name: [row.get(name) for row in rows] for name in columns}), parquet)  # missing: null
    for path in (jsonl, parquet):
        first, second = (row.request for row in read_rows(path, {"width": 48, "seed": 100}))
        assert first is not None and second is not None
        assert (first.seed, first.num_images, first.width) == (7, 2, 48)
        assert (second.seed, second.height, second.width, second.guider) == (101, 32, 48, "AdaptiveProjectedGuidance")


def test_prompts_in_memory_are_rows_too() -> None:
    rows = read_rows(["a red circle", {"prompt": "a blue square", "seed": 3}], {})
    assert [(row.prompt, row.request.seed if row.request else None) for row in rows] == [("a red circle", 0), ("a blue square", 3)]


def test_a_bad_row_keeps_its_error_and_the_others_stay(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    lines = ['{"prompt": "ok"}', '{"prompt": "x", "seed": -1}', '["a list"]', '{"prompt": "y", "colour": 3}', "{oops"]
    path.write_text("\n".join(lines))
    rows = read_rows(path, {})
    assert rows[0].error is None and rows[0].request is not None
    assert rows[1].error == "seed: Input should be greater than or equal to 0"
    assert rows[2].error == "a row is a prompt or an object of request fields, got list"
    assert rows[3].error == "colour: Extra inputs are not permitted"
    assert rows[4].error is not None and rows[4].error.startswith("line 5 is not JSON: ")
    assert all(row.request is None for row in rows[1:])


@pytest.mark.parametrize(
    ("name", "text", "defaults", "message"),
    [
        ("p.csv", "a", {}, "unknown prompts file type '.csv'; give a .txt file"),
        ("missing.txt", None, {}, "no such prompts file"),
        ("empty.txt", "\n\n", {}, "no prompts (blank lines are skipped)"),
        ("p.txt", "a", {"num_images": 0}, "num_images: Input should be greater than or equal to 1"),
        ("p.txt", "a", {"guider": "Nope"}, "guider: Value error, unknown guider 'Nope'"),
        ("p.txt", "a", {"prompt": "x"}, "prompt: each row gives its own prompt"),
    ],
)
def test_bad_files_and_defaults_are_refused_before_any_work(
    tmp_path: Path, name: str, text: str | None, defaults: dict[str, object], message: str
) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_rows(path, defaults)


def test_manifest_parts_merge_into_one_file_and_a_redone_image_replaces_its_record(tmp_path: Path) -> None:
    ok, bad = read_rows(["a red circle", {"prompt": "x", "seed": -1}], {"num_images": 2})
    manifest = Manifest(tmp_path)
    (tmp_path / "images").mkdir()
    for k in range(2):
        (tmp_path / "images" / f"000000-{k}.png").write_bytes(b"png")
    manifest.write_part(image_records(ok, ["images/000000-0.png", "images/000000-1.png"], seconds=2.0, worker="w:1", model=None))
    manifest.write_part([error_record(bad, bad.error or "", worker=None, model=None)])
    assert manifest.done([ok, bad], None) == {0, 1}
    (tmp_path / "images" / "000000-1.png").unlink()
    assert manifest.done([ok, bad], None) == {1}  # an image file gone: the row is made again
    manifest.write_part(image_records(ok, ["images/000000-0.png", "images/000000-1.png"], seconds=1.0, worker="w:2", model=None))
    records = manifest.merge()
    assert not manifest.parts.exists() and manifest.path.is_file()
    assert [(r["row"], r["image"], r["seed"], r["worker"], r["seconds"]) for r in records] == [
        (0, 0, 0, "w:2", 0.5), (0, 1, 1, "w:2", 0.5), (1, None, None, None, None)
    ]
    assert pq.read_table(manifest.path).to_pylist() == records


def test_a_folder_of_another_batch_is_refused(tmp_path: Path) -> None:
    (row,) = read_rows(["a red circle"], {})
    Manifest(tmp_path).write_part(image_records(row, ["images/000000-0.png"], seconds=1.0, worker="w", model=None))
    (other,) = read_rows(["a blue square"], {})
    with pytest.raises(ValueError, match="already holds row 0 of another batch .*give a new output folder"):
        Manifest(tmp_path).done([other], None)
    with pytest.raises(ValueError, match="model was None, now 'some/model'"):
        Manifest(tmp_path).done([row], "some/model")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"workers": 0}, "workers must be at least 1, got 0"),
        ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
        ({"cpus_per_worker": 0.0}, "cpus_per_worker must be a positive number"),
        ({"retries": -1}, "retries must be 0 or more"),
        ({"model": "m", "loader": lambda: None}, "give model or loader, not both"),
    ],
)
def test_bad_settings_are_refused_before_ray_starts(tmp_path: Path, settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_batch(["a red circle"], tmp_path / "out", **settings)
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.txt").write_text("a red circle\n")
    (tmp_path / "out").write_text("")
    assert main(["batch", str(tmp_path / "p.txt"), "-o", str(tmp_path / "out")]) == 2
    assert f"diffblocks batch: error: {tmp_path / 'out'} is a file" in capsys.readouterr().err


def test_the_command_reports_bad_prompts_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["batch", str(tmp_path / "p.csv"), "-o", str(tmp_path / "out"), "--size", "32", "--height", "32"]) == 2
    assert capsys.readouterr().err == "diffblocks batch: error: give --size or --height/--width, not both\n"
    assert main(["batch", str(tmp_path / "p.csv"), "-o", str(tmp_path / "out")]) == 2
    assert "unknown prompts file type '.csv'" in capsys.readouterr().err


def test_without_ray_the_command_and_the_function_give_the_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError, as where it is not installed
    (tmp_path / "p.txt").write_text("a red circle\n")
    with pytest.raises(ModuleNotFoundError, match=r'pip install -e "\.\[ray\]"'):
        generate_batch(tmp_path / "p.txt", tmp_path / "out")
    assert main(["batch", str(tmp_path / "p.txt"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffblocks batch: error: batch generation runs on Ray, which is not installed")
    assert 'pip install -e ".[ray]"' in err and not (tmp_path / "out").exists()


def test_merging_without_parts_writes_nothing(tmp_path: Path) -> None:
    """A run stopped before its first batch leaves no manifest, and no folder where there was none."""
    assert Manifest(tmp_path / "never").merge() == []
    assert not (tmp_path / "never").exists()
