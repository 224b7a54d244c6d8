"""Batch generation on a local Ray cluster (2 CPUs) with the built-in model at 32 pixels and 2 steps.

One batch of 64 prompts (and three bad rows) runs once for the module on 2 workers; the other tests
rerun parts of it, killed or interrupted, and compare their images with it, file for file.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffblocks.presets.tiny import EVAL_PROMPTS
from diffblocks.scale import BatchSummary, GenerationRequest, RequestRunner, generate_batch
from diffblocks.scale.manifest import Manifest
from diffblocks.scale.rows import read_rows

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"height": 32, "width": 32, "num_inference_steps": 2}
KILL_SEED = 6  # row 6 kills its worker once
STALL_SEED = 8  # row 8 waits until released, so the driver can be interrupted with rows on both sides


def _rows() -> list[Any]:
    """64 prompts, two with settings of their own, then a bad size, a bad prompt type and a line that is not JSON."""
    rows: list[Any] = [{"prompt": prompt} for prompt in EVAL_PROMPTS[:64]]
    rows[5]["seed"] = 1234
    rows[7]["num_images"] = 2
    rows += [{"prompt": "a red circle", "height": 30}, {"prompt": 3}]
    return [json.dumps(row) for row in rows] + ["{not json"]


def _write_prompts(path: Path, count: int | None = None) -> Path:
    lines = _rows()[:count] if count is not None else _rows()
    path.write_text("\n".join(lines) + "\n")
    return path


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _manifest(out: Path) -> list[dict[str, Any]]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


def _assert_same_images(out: Path, reference: Path, rows: range) -> None:
    records = [record for record in _manifest(out) if record["row"] in rows]
    assert records, "no images to compare"
    for record in records:
        assert np.array_equal(_pixels(out / record["file"]), _pixels(reference / record["file"])), record["file"]


@pytest.fixture(scope="module")
def first_run(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BatchSummary]:
    folder = tmp_path_factory.mktemp("batch")
    prompts = _write_prompts(folder / "prompts.jsonl")
    summary = generate_batch(prompts, folder / "out", workers=2, batch_size=5, progress=False, **SMALL)
    return folder / "out", summary


def test_two_workers_make_the_images_of_a_plain_loop_in_one_process(first_run: tuple[Path, BatchSummary], tmp_path: Path) -> None:
    out, summary = first_run
    rows = read_rows(_write_prompts(tmp_path / "prompts.jsonl"), SMALL)
    runner = RequestRunner.load(device="cpu")
    records = {(record["row"], record["image"]): record for record in _manifest(out)}
    compared = 0
    for row in rows[:64]:
        assert row.request is not None
        for k, image in enumerate(runner.images(row.request)):
            record = records[(row.index, k)]
            assert record["seed"] == row.request.seed + k and record["error"] is None
            assert np.array_equal(_pixels(out / record["file"]), np.asarray(image.convert("RGB"))), record["file"]
            compared += 1
    assert compared == 65  # row 7 makes two
    assert summary.images == 65 and summary.made == 64 and summary.rows == 67
    assert sum(stats.images for stats in summary.workers.values()) == 65


def test_manifest_records_every_image_once_and_bad_rows_with_their_errors(first_run: tuple[Path, BatchSummary]) -> None:
    out, summary = first_run
    records = _manifest(out)
    keys = [(record["row"], record["image"]) for record in records]
    assert len(keys) == len(set(keys)) == 68  # 65 images and 3 failed rows
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(r["file"].split("/")[1] for r in records if r["file"])
    assert records[5]["seed"] == 1234 and records[9]["seed"] == 8  # row 8 gets the base seed (0) + 8
    assert [(r["row"], r["image"]) for r in records if r["row"] == 7] == [(7, 0), (7, 1)]
    assert {r["height"] for r in records if r["error"] is None} == {32}
    failed = {r["row"]: r["error"] for r in records if r["error"] is not None}
    assert "height 30 is not a positive multiple of 4 (the VAE factor); use 28 or 32" in failed[64]
    assert failed[65] == "prompt: Input should be a valid string"
    assert failed[66].startswith("line 67 is not JSON")
    assert summary.failed == 3 and all(r["worker"] for r in records if r["row"] < 65)
    assert not (out / "manifest.parts").exists()
    assert "65 images from 64 rows" in str(summary) and "3 failed" in str(summary)


def test_running_again_skips_everything_done(first_run: tuple[Path, BatchSummary]) -> None:
    out, _ = first_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    summary = generate_batch(_write_prompts(out.parent / "prompts.jsonl"), out, workers=2, progress=False, **SMALL)
    assert (summary.skipped, summary.made, summary.images, summary.failed) == (67, 0, 0, 0)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == before
    with pytest.raises(ValueError, match="already holds row 0 of another batch"):
        generate_batch(_write_prompts(out.parent / "prompts.jsonl"), out, seed=5, progress=False, **SMALL)


def _killing_runner(marker: str) -> Any:
    """A runner whose worker process dies (SIGKILL) on the row seeded ``KILL_SEED``, the first time only."""

    class Killing:
        def __init__(self) -> None:
            self.runner = RequestRunner.load(device="cpu")

        def images(self, request: GenerationRequest) -> list[Any]:
            if request.seed == KILL_SEED and not os.path.exists(marker):
                Path(marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return self.runner.images(request)

    return Killing()


def test_a_killed_worker_is_replaced_and_its_rows_redone(first_run: tuple[Path, BatchSummary], tmp_path: Path) -> None:
    reference, _ = first_run
    marker = tmp_path / "killed"
    loader = functools.partial(_killing_runner, str(marker))
    out = tmp_path / "out"
    summary = generate_batch(_write_prompts(tmp_path / "p.jsonl", 12), out, workers=2, batch_size=4, loader=loader, progress=False, **SMALL)
    assert marker.exists()  # a worker did die
    assert (summary.made, summary.images, summary.failed) == (12, 13, 0)  # nothing missing, nothing twice
    assert sorted((r["row"], r["image"]) for r in _manifest(out)) == sorted([(k, 0) for k in range(12)] + [(7, 1)])
    assert len(list((out / "images").iterdir())) == 13
    dead = int(marker.read_text())
    assert dead not in {int(r["worker"].rsplit(":", 1)[1]) for r in _manifest(out) if r["row"] == 6}
    _assert_same_images(out, reference, range(12))


def _stalling_runner(folder: str) -> Any:
    """A runner that stops on the row seeded ``STALL_SEED`` until ``folder/release`` exists."""

    class Stalling:
        def __init__(self) -> None:
            self.runner = RequestRunner.load(device="cpu")

        def images(self, request: GenerationRequest) -> list[Any]:
            if request.seed == STALL_SEED:
                Path(folder, "stalled").touch()
                deadline = time.monotonic() + 120
                while not Path(folder, "release").exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
            return self.runner.images(request)

    return Stalling()


_DRIVER = """
import functools, sys
from diffblocks.scale import generate_batch
from tests.scale.test_batch import SMALL, _stalling_runner
folder, address = sys.argv[1], sys.argv[2]
generate_batch(folder + "/p.jsonl", folder + "/out", address=address, workers=1, batch_size=2, progress=False,
               loader=functools.partial(_stalling_runner, folder), **SMALL)
"""


def test_an_interrupted_run_resumes_without_losing_or_remaking_a_row(
    first_run: tuple[Path, BatchSummary], ray_cluster: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffblocks.cli import main

    reference, _ = first_run
    prompts = _write_prompts(tmp_path / "p.jsonl", 12)
    out = tmp_path / "out"
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tmp_path), address], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "stalled").exists() and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.2)
        assert (tmp_path / "stalled").exists(), "the run never reached the stalling row"
        while len(list((out / "manifest.parts").glob("part-*"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)  # the four batches before the stalling one
        driver.send_signal(signal.SIGINT)  # Ctrl-C
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
        (tmp_path / "release").touch()
    done = Manifest(out).records()
    assert {r["row"] for r in done} >= set(range(8)) and 8 not in {r["row"] for r in done}
    before = {r["file"]: os.stat(out / r["file"]).st_mtime_ns for r in done}

    argv = ["batch", str(prompts), "-o", str(out), "--size", "32", "--steps", "2", "--workers", "2", "--no-progress"]
    assert main(argv) == 0
    assert f"{len({r['row'] for r in done})} rows already done" in capsys.readouterr().out
    records = _manifest(out)
    assert sorted((r["row"], r["image"]) for r in records) == sorted([(k, 0) for k in range(12)] + [(7, 1)])
    assert {r["file"]: os.stat(out / r["file"]).st_mtime_ns for r in records if r["file"] in before} == before
    _assert_same_images(out, reference, range(12))
