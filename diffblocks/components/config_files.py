"""The JSON files a repository holds (indexes and configs), read as one object each, with errors that name the file.

A repository is data from someone else: a file may be truncated, hold a list or a string, nest
thousands of levels deep (``json`` then fails with a bare ``RecursionError``), or be gigabytes
long. Every loader reads its JSON here, so each of those fails the same way, naming the file, the
place in it and what a valid file holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 64 * 2**20
"""Largest JSON file read (64 MiB): a config is a few kB; the weight index of a 100B-parameter model is a few MB."""

MAX_JSON_DEPTH = 32
"""Deepest nesting of lists and objects accepted; diffusers' own files nest at most 4 levels."""


class ConfigFileError(ValueError):
    """A repository's JSON file is unreadable, malformed, or not the object a loader expects."""


def read_json_object(path: str | os.PathLike[str], *, what: str = "a JSON object") -> dict[str, Any]:
    """The JSON object in ``path``.

    Args:
        path: the file.
        what: what the file should hold, for messages (``"a model config"``, ``"a weight index"``).

    Raises:
        FileNotFoundError: no such file.
        ConfigFileError: the file is too large, not UTF-8, not JSON, nested too deep, or not an object.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ConfigFileError(f"{path} is {size / 2**20:.0f} MiB; {what} is at most {MAX_JSON_BYTES // 2**20} MiB of JSON")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigFileError(f"{path} is not UTF-8 text (byte {err.start}); it should hold {what}") from None
    except json.JSONDecodeError as err:
        raise ConfigFileError(
            f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}; it should hold {what}"
        ) from None
    except RecursionError:
        raise ConfigFileError(f"{path} nests lists or objects too deeply to read; it should hold {what}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path} holds a JSON {_json_kind(data)}, not an object; it should hold {what}")
    if _deeper_than(data, MAX_JSON_DEPTH):
        raise ConfigFileError(f"{path} nests lists or objects more than {MAX_JSON_DEPTH} levels deep; it should hold {what}")
    return data


def _json_kind(value: object) -> str:
    names = {list: "list", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _deeper_than(value: object, limit: int) -> bool:
    """Whether lists and objects nest more than ``limit`` levels, found without recursion."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if level > limit:
            return True
        stack.extend((child, level + 1) for child in children)
    return False


__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "ConfigFileError", "read_json_object"]
