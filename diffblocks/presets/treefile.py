"""A block tree as JSON: every node's class, name and config, and the composites' structure.

A saved pipeline whose tree differs from its family's records the tree under ``_diffblocks_blocks``
in ``modular_model_index.json``. A leaf is named one of two ways:

* ``"block": [library, class name]``: a block of the block registry (the built-in blocks, and
  those that installed packages declare under the ``diffblocks.blocks`` entry-point group);
* ``"code": "blocks/<module>.py", "class": "<qualified name>"``: a block written by the user, whose
  module is saved beside the index and loaded only when trusted (:mod:`diffblocks.presets.remote_code`).

Composites are ``{"name", "sequence": [...]}``, ``{"name", "loop": [...], "over", "item", "index",
"count"}`` and ``{"name", "switch": [{"branch", "when", "block"}, ...]}``. Loading rebuilds every leaf
as ``cls(name=name, **config)``, so saving checks that this gives back the same block.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

from diffblocks.blocks import AbstractBlock, Block, Branch, Loop, Sequence, Switch
from diffblocks.blocks.tree import join
from diffblocks.registry import Registry, RegistryError

TREE_KEY = "_diffblocks_blocks"
CODE_KEY = "_diffblocks_code"
CODE_FOLDER = "blocks"
CODE_ATTRIBUTE = "__diffblocks_code__"  # set on modules loaded from a repository: their file there
MAX_DEPTH = 64

_MSG_NO_SOURCE = (
    "block {path!r} is a {cls}, which is not in the block registry and whose code cannot be saved: {why}. "
    "Define the block at the top level of a module file (a .py file you import), or register it "
    "(diffblocks.registry.BLOCKS.register((library, name), cls), or the 'diffblocks.blocks' entry-point group)."
)
_MSG_NOT_REBUILT = (
    "block {path!r} ({cls}) cannot be saved: loading rebuilds it as {name}(name=..., **config), and {why}. "
    "Keep its settings in its Config, with JSON values, and let __init__ take them as keyword arguments."
)
_MSG_BAD_NODE = "{source}: the saved block tree is malformed at {path!r}: {why}. Save the pipeline again with diffblocks."


@dataclass(frozen=True)
class SavedTree:
    """A tree as JSON, and the code files its user-written blocks need: path in the folder -> file on disk."""

    data: dict[str, Any]
    code: dict[str, Path]


def tree_to_json(root: AbstractBlock, *, registry: Registry) -> SavedTree:
    """``root`` as JSON, each leaf by registry name or by its module's code.

    Raises:
        ValueError: a leaf is neither registered nor defined at the top level of a module file, or
            ``cls(name=..., **config)`` does not rebuild it; a block is of a kind that cannot be saved.
    """
    code: dict[str, Path] = {}
    return SavedTree(_node(root, "", registry, code), code)


def _node(block: AbstractBlock, path: str, registry: Registry, code: dict[str, Path]) -> dict[str, Any]:
    """One node as JSON; ``path`` is its path in the tree (as ``Pipeline.replace_block`` takes; the root's is "")."""

    def below(child: AbstractBlock, key: str) -> dict[str, Any]:
        return _node(child, join(path, key), registry, code)

    if isinstance(block, Sequence):
        return {"name": block.name, "sequence": [below(c, c.name) for c in block.blocks]}
    if isinstance(block, Loop):
        attrs = {"over": block.over, "item": block.item, "index": block.index, "count": block.count}
        return {"name": block.name, "loop": [below(c, c.name) for c in block.blocks], **attrs}
    if isinstance(block, Switch):
        branches = [{"branch": b.name, "when": list(b.when), "block": below(b.block, b.name)} for b in block.branches]
        return {"name": block.name, "switch": branches}
    path = path or block.name
    if not isinstance(block, Block):
        raise ValueError(f"block {path!r} is a {_qualified(type(block))}: only Block leaves and the composites "
                         "Sequence, Loop and Switch can be saved")
    cls = type(block)
    config = block.config.model_dump(mode="json")
    _check_rebuilds(block, config, path)
    try:
        library, name = registry.key_of(cls)
        return {"name": block.name, "block": [library, name], "config": config}
    except RegistryError:
        pass
    file, source = _code_file(cls, path)
    known = code.setdefault(file, source)
    if known != source:
        raise ValueError(f"block {path!r}: two different modules would be saved as {file!r} ({known}, {source})")
    return {"name": block.name, "code": file, "class": cls.__qualname__, "config": config}


def _check_rebuilds(block: Block, config: dict[str, Any], path: str) -> None:
    cls = type(block)
    try:
        rebuilt = cls(name=block.name, **config)
        why = None if type(rebuilt) is cls and rebuilt.config == block.config else "it gives another block"
    except Exception as err:  # whatever the user's __init__ raises: reported with the block's path
        why = f"that raises {type(err).__name__}: {err}"
    if why is not None:
        raise ValueError(_MSG_NOT_REBUILT.format(path=path, cls=_qualified(cls), name=cls.__name__, why=why))


def _code_file(cls: type, path: str) -> tuple[str, Path]:
    """Where a user-written block's module is saved in the folder, and its file on this machine."""
    module = sys.modules.get(cls.__module__)
    why = _why_no_source(cls, module)
    if why is not None:
        raise ValueError(_MSG_NO_SOURCE.format(path=path, cls=_qualified(cls), why=why))
    assert module is not None and module.__file__ is not None
    saved = getattr(module, CODE_ATTRIBUTE, None)  # a block loaded from a repository keeps its file's name
    file = saved if isinstance(saved, str) else f"{CODE_FOLDER}/{cls.__module__.replace('.', '/')}.py"
    return file, Path(module.__file__)


def _why_no_source(cls: type, module: ModuleType | None) -> str | None:
    if "<locals>" in cls.__qualname__:
        return "it is defined inside a function"
    if module is None or cls.__module__ == "__main__":
        return "it is defined in a script or an interactive session, not in a module file"
    file = getattr(module, "__file__", None)
    if not isinstance(file, str) or not file.endswith(".py") or not Path(file).is_file():
        return f"its module {cls.__module__!r} has no .py file"
    value: Any = module
    for part in cls.__qualname__.split("."):
        value = getattr(value, part, None)
    if value is not cls:
        return f"{cls.__module__}.{cls.__qualname__} is not that class once the module is imported"
    return None


def code_files(data: Any) -> list[str]:
    """The code files a saved tree's leaves name (not checked: :func:`tree_from_json` checks the tree)."""
    found: list[str] = []
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("code"), str) and node["code"] not in found:
                found.append(node["code"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return sorted(found)


def tree_from_json(
    data: Any, *, registry: Registry, code_class: Callable[[str, str], type], source: str
) -> AbstractBlock:
    """The tree :func:`tree_to_json` wrote.

    Args:
        data: the JSON.
        registry: resolves ``"block"`` leaves (the allowlist: nothing else is imported).
        code_class: ``(file, qualified name) -> class`` for ``"code"`` leaves, from modules already
            verified and imported.
        source: the index file, for messages.

    Raises:
        ValueError: the tree is malformed, or names a class that is not a block.
        RegistryError: a ``"block"`` leaf names a class outside the registry.
    """
    return _build(data, "", 0, registry, code_class, source)


def _build(
    node: Any, path: str, depth: int, registry: Registry, code_class: Callable[[str, str], type], source: str
) -> AbstractBlock:
    """The block of ``node``, whose path in the tree is ``path`` (as ``Pipeline.replace_block`` takes; the root's is "")."""

    def bad(why: str) -> ValueError:
        return ValueError(_MSG_BAD_NODE.format(source=source, path=path or "(the root)", why=why))

    if depth > MAX_DEPTH:
        raise bad(f"it is nested deeper than {MAX_DEPTH} levels")
    if not isinstance(node, dict) or not isinstance(node.get("name"), str) or not node["name"]:
        raise bad("each block is an object with a non-empty 'name'")
    name = node["name"]

    def children(key: str) -> list[AbstractBlock]:
        items = node[key]
        if not isinstance(items, list):
            raise bad(f"{key!r} must be a list of blocks")
        return [_build(item, join(path, _name(item)), depth + 1, registry, code_class, source) for item in items]

    try:
        if "sequence" in node:
            return Sequence(*children("sequence"), name=name)
        if "loop" in node:
            attrs = {key: node.get(key) for key in ("over", "item", "index", "count")}
            if not all(isinstance(value, str) and value for value in attrs.values()):
                raise bad("a loop needs the strings 'over', 'item', 'index' and 'count'")
            return Loop(*children("loop"), name=name, **attrs)
        if "switch" in node:
            return Switch(*_branches(node["switch"], path, depth, registry, code_class, source, bad), name=name)
    except (TypeError, ValueError) as err:
        if str(err).startswith(source):
            raise
        raise bad(str(err)) from None  # a composite's own refusal (two blocks of one name, ...)
    return _leaf(node, registry, code_class, bad)


def _name(node: Any) -> str:
    return node["name"] if isinstance(node, dict) and isinstance(node.get("name"), str) else "?"


def _branches(
    items: Any,
    path: str,
    depth: int,
    registry: Registry,
    code_class: Callable[[str, str], type],
    source: str,
    bad: Callable[[str], ValueError],
) -> list[Branch]:
    if not isinstance(items, list):
        raise bad("'switch' must be a list of branches")
    branches = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("branch"), str) or not isinstance(item.get("when"), list):
            raise bad("each branch is an object with 'branch' (a name), 'when' (input names) and 'block'")
        if not all(isinstance(w, str) for w in item["when"]):
            raise bad(f"branch {item['branch']!r}: 'when' lists input names")
        block = _build(item.get("block"), join(path, item["branch"]), depth + 1, registry, code_class, source)
        branches.append(Branch(item["branch"], block, tuple(item["when"])))
    return branches


def _leaf(
    node: dict[str, Any],
    registry: Registry,
    code_class: Callable[[str, str], type],
    bad: Callable[[str], ValueError],
) -> Block:
    config = node.get("config", {})
    if not isinstance(config, dict):
        raise bad("'config' must be an object")
    if isinstance(node.get("block"), list) and len(node["block"]) == 2:
        cls = registry.resolve((node["block"][0], node["block"][1]))
    elif isinstance(node.get("code"), str) and isinstance(node.get("class"), str):
        cls = code_class(node["code"], node["class"])
    else:
        raise bad("a block names its class with 'block': [library, name], or 'code' and 'class'")
    if not (isinstance(cls, type) and issubclass(cls, Block)) or inspect.isabstract(cls):
        raise bad(f"{_qualified(cls)} is not a block class")
    try:
        return cls(name=node["name"], **config)
    except Exception as err:  # the block's own validation (a pydantic error names the field)
        raise bad(f"{_qualified(cls)}(name={node['name']!r}, **config) raised {type(err).__name__}: {err}") from err


def is_code_path(file: str) -> bool:
    """Whether ``file`` can name a code file: a relative POSIX path to a ``.py`` file (containment checks the rest)."""
    return file.endswith(".py") and not PurePosixPath(file).is_absolute() and "\\" not in file


def _qualified(cls: Any) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"


__all__ = [
    "CODE_ATTRIBUTE",
    "CODE_FOLDER",
    "CODE_KEY",
    "TREE_KEY",
    "SavedTree",
    "code_files",
    "is_code_path",
    "tree_from_json",
    "tree_to_json",
]
