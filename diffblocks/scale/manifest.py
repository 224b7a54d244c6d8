"""The manifest of a batch: one Parquet record per image (or per failed row), written part by part.

A run writes a part file for each finished batch of rows (``manifest.parts/part-*.parquet``, each
written to a temporary name and renamed, so a part is whole or absent), and merges the parts into
``manifest.parquet`` at the end. A run that stopped half-way leaves its parts; the next run reads
them with the manifest to find the rows already done, so it neither loses them nor makes them again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from diffblocks.scale.rows import BatchRow

SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("image", pa.int64()),  # k of the row's images (null for a failed row)
        ("file", pa.string()),  # relative to the output folder
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),  # this image's seed: the row's seed + k
        ("num_images", pa.int64()),
        ("height", pa.int64()),  # null: the model's default, as for the other settings
        ("width", pa.int64()),
        ("num_inference_steps", pa.int64()),
        ("guidance_scale", pa.float64()),
        ("guider", pa.string()),
        ("scheduler", pa.string()),
        ("model", pa.string()),
        ("request", pa.string()),  # the row as resolved (BatchRow.key)
        ("seconds", pa.float64()),  # the row's time over its images
        ("error", pa.string()),
        ("worker", pa.string()),  # host:pid of the actor that made it
    ]
)

_MSG_OTHER_BATCH = (
    "{output} already holds row {row} of another batch ({field} was {old!r}, now {new!r}); "
    "give a new output folder, or delete this one to start over"
)


def image_records(row: BatchRow, files: Sequence[str], *, seconds: float, worker: str, model: str | None) -> list[dict[str, Any]]:
    """The records of a row that made its images, one per file."""
    assert row.request is not None
    request = row.request.model_dump(exclude={"prompt", "seed"})
    base = {"row": row.index, "prompt": row.request.prompt, **request, "model": model, "request": row.key}
    share = seconds / max(len(files), 1)
    return [
        {**base, "image": k, "file": file, "seed": row.request.seed + k, "seconds": share, "error": None, "worker": worker}
        for k, file in enumerate(files)
    ]


def error_record(row: BatchRow, error: str, *, worker: str | None, model: str | None) -> dict[str, Any]:
    """The one record of a row that failed on its own."""
    settings = row.request.model_dump() if row.request is not None else {}
    record = {**dict.fromkeys(SCHEMA.names), **settings, "row": row.index, "model": model, "request": row.key}
    return {**record, "error": error, "worker": worker}


class Manifest:
    """The manifest and part files of one output folder."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.path = output / "manifest.parquet"
        self.parts = output / "manifest.parts"

    def records(self) -> list[dict[str, Any]]:
        """Every record written so far, the latest one of each image (a redone image replaces its record)."""
        latest: dict[tuple[int, int], dict[str, Any]] = {}
        for path in [self.path] if self.path.is_file() else []:
            self._keep(latest, pq.read_table(path, schema=SCHEMA).to_pylist())
        for path in sorted(self.parts.glob("part-*.parquet")) if self.parts.is_dir() else []:
            self._keep(latest, pq.read_table(path, schema=SCHEMA).to_pylist())
        return sorted(latest.values(), key=lambda record: (record["row"], record["image"] if record["image"] is not None else -1))

    @staticmethod
    def _keep(latest: dict[tuple[int, int], dict[str, Any]], records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            latest[(record["row"], record["image"] if record["image"] is not None else -1)] = record

    def done(self, rows: Sequence[BatchRow], model: str | None) -> set[int]:
        """The rows already finished: every image recorded and its file present, or the row's error recorded.

        Raises ``ValueError`` when a recorded row was made from another request or model: the folder
        holds another batch, and mixing the two would leave a manifest that describes neither.
        """
        by_row: dict[int, list[dict[str, Any]]] = {}
        for record in self.records():
            by_row.setdefault(record["row"], []).append(record)
        done: set[int] = set()
        for row in rows:
            records = by_row.get(row.index, [])
            for record in records:
                for field, old, new in (("request", record["request"], row.key), ("model", record["model"], model)):
                    if old != new:
                        raise ValueError(_MSG_OTHER_BATCH.format(output=self.output, row=row.index, field=field, old=old, new=new))
            if any(record["error"] is not None for record in records):
                done.add(row.index)
            elif row.request is not None and self._complete(records, row.request.num_images):
                done.add(row.index)
        return done

    def _complete(self, records: Sequence[dict[str, Any]], num_images: int) -> bool:
        images = {record["image"] for record in records if (self.output / record["file"]).is_file()}
        return images == set(range(num_images))

    def write_part(self, records: Sequence[dict[str, Any]]) -> Path | None:
        """Write ``records`` as a new part (atomically); None when there are none."""
        if not records:
            return None
        self.parts.mkdir(parents=True, exist_ok=True)
        # the time first, so parts sort in the order they were written, across runs
        path = self.parts / f"part-{time.time_ns():020d}-{os.getpid()}.parquet"
        _write(path, records)
        return path

    def merge(self) -> list[dict[str, Any]]:
        """Merge the parts into ``manifest.parquet`` (atomically), then remove them; returns the records."""
        parts = sorted(self.parts.glob("part-*.parquet")) if self.parts.is_dir() else []
        records = self.records()
        if parts:  # (a run stopped before its first batch leaves no manifest rather than an empty one)
            _write(self.path, records)
        for part in parts:  # after the manifest holds them: a run stopped here reads them twice, not never
            part.unlink()
        if self.parts.is_dir() and not any(self.parts.iterdir()):
            self.parts.rmdir()
        return records


def _write(path: Path, records: Sequence[dict[str, Any]]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    columns = {name: [record.get(name) for record in records] for name in SCHEMA.names}
    pq.write_table(pa.table(columns, schema=SCHEMA), temporary)
    os.replace(temporary, path)
