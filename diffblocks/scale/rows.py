"""Batch rows: prompts read from a text, JSON-lines or Parquet file, resolved into requests.

A row is a prompt (a line of a ``.txt`` file) or an object of :class:`GenerationRequest` fields (a
line of a ``.jsonl`` file, a row of a ``.parquet`` file). Rows are numbered from 0 in file order,
blank lines not counted; the number is the row's id in the manifest and its image files. Fields a
row leaves out (or gives as null) take the batch's defaults, and a row without a seed gets the
batch's seed plus its number, so every row is reproducible on its own. A row that cannot become a
request keeps its error, and the batch goes on without it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from diffblocks.scale.request import GenerationRequest

SUFFIXES = (".txt", ".jsonl", ".parquet")

_MSG_UNKNOWN_SUFFIX = (
    "{path}: unknown prompts file type {suffix!r}; give a .txt file (one prompt per line), a .jsonl file "
    "or a .parquet file (one row per prompt with optional GenerationRequest fields)"
)


@dataclass(frozen=True)
class BatchRow:
    """Row ``index`` of a batch: its request, or the error that kept it from being one.

    ``key`` is the row as resolved (the request's JSON, or the row as given when it is bad): a run
    that finds a manifest entry for this row with another key refuses to mix the two batches.
    """

    index: int
    request: GenerationRequest | None
    error: str | None
    key: str

    @property
    def prompt(self) -> str | None:
        return self.request.prompt if self.request is not None else None


@dataclass(frozen=True)
class _Unreadable:
    """A line of a JSON-lines file that is not JSON."""

    message: str


def read_rows(source: str | Path | Sequence[str | Mapping[str, Any]], defaults: Mapping[str, Any]) -> list[BatchRow]:
    """The rows of ``source`` (a prompts file, or prompts and row mappings in memory) as requests.

    ``defaults`` are :class:`GenerationRequest` fields for what a row leaves out; its ``seed`` is the
    base seed: row ``k`` without a seed of its own gets ``seed + k``. Raises ``ValueError`` for a bad
    file or bad defaults (before any work); a bad row becomes a :class:`BatchRow` with an error.
    """
    check_defaults(defaults)
    raw = _read(Path(source)) if isinstance(source, (str, Path)) else list(source)
    if not raw:
        raise ValueError(f"{source}: no prompts (blank lines are skipped)" if isinstance(source, (str, Path)) else "no prompts")
    return [_resolve(index, value, defaults) for index, value in enumerate(raw)]


def check_defaults(defaults: Mapping[str, Any]) -> None:
    """Refuse defaults that no row could use, naming the field, before any file is read."""
    if "prompt" in defaults:
        raise ValueError("prompt: each row gives its own prompt; it cannot be a default")
    try:
        GenerationRequest(prompt="", **{name: value for name, value in defaults.items() if value is not None})
    except ValidationError as error:
        raise ValueError(_problems(error)) from None


def _read(path: Path) -> list[Any]:
    if path.suffix not in SUFFIXES:
        raise ValueError(_MSG_UNKNOWN_SUFFIX.format(path=path, suffix=path.suffix))
    if not path.is_file():
        raise ValueError(f"{path}: no such prompts file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    if path.suffix == ".txt":
        return [line for line in lines if line]
    return [_json_line(number, line) for number, line in enumerate(lines, start=1) if line]


def _json_line(number: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        return _Unreadable(f"line {number} is not JSON: {error.msg} at column {error.colno}")


def _resolve(index: int, value: Any, defaults: Mapping[str, Any]) -> BatchRow:
    if isinstance(value, _Unreadable):
        return BatchRow(index, None, value.message, key=json.dumps({"error": value.message}))
    fields = {"prompt": value} if isinstance(value, str) else value
    if not isinstance(fields, Mapping):
        message = f"a row is a prompt or an object of request fields, got {type(value).__name__}"
        return BatchRow(index, None, message, key=json.dumps({"error": message}))
    given = {name: field for name, field in fields.items() if field is not None}
    settings = {name: field for name, field in defaults.items() if field is not None}
    settings["seed"] = settings.get("seed", 0) + index
    try:
        request = GenerationRequest(**{**settings, **given})
    except ValidationError as error:
        return BatchRow(index, None, _problems(error), key=json.dumps(given, sort_keys=True, default=repr))
    return BatchRow(index, request, None, key=request.model_dump_json())


def _problems(error: ValidationError) -> str:
    """Pydantic's problems as ``field: message`` parts, one line."""
    return "; ".join(
        f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}" if problem["loc"] else problem["msg"]
        for problem in error.errors()
    )
