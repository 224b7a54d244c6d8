"""Import the block code a saved pipeline carries: only when trusted, pinned and verified.

A pipeline saved with user-written blocks carries their modules, and its index records each file
with its sha256 (see :mod:`diffblocks.presets.treefile`). Loading runs that code, so:

1. ``DIFFBLOCKS_NO_REMOTE_CODE=1`` refuses all of it, whatever the caller passes;
2. the caller must pass ``trust_remote_code=True``;
3. from the Hub, also a ``revision`` that is a full commit hash, so that what was read is what runs
   (a branch can move between reading the code and loading it);
4. every file must lie inside the repository and match its recorded hash, all checked before any
   is imported;
5. each module is imported under a name private to the repository, revision and file hash
   (``diffblocks_code.r<digest>.<module>``), without touching ``sys.path``: two repositories with a
   module of the same name do not collide, and nothing else can import it by accident.

Every refusal names the files that would run and what to pass.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

from diffblocks.components.containment import contained_path
from diffblocks.components.hub import resolve_folder
from diffblocks.presets.treefile import CODE_ATTRIBUTE, is_code_path

ENV_NO_REMOTE_CODE = "DIFFBLOCKS_NO_REMOTE_CODE"
NAMESPACE = "diffblocks_code"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

_MSG_DISABLED = (
    "{repository} carries block code that would run when it is loaded: {files}. {env} is set in this environment, "
    "which refuses all code from repositories. Unset it to load this pipeline, or load the family's own blocks."
)
_MSG_UNTRUSTED = (
    "{repository} carries block code that would run when it is loaded: {files}. Read these files, then pass "
    "{fix} to run them."
)
_MSG_UNPINNED = (
    "{repository} carries block code that would run when it is loaded: {files}. Code from the Hub runs only "
    "from a pinned commit, so that the code you read is the code that runs: pass {fix}{current}."
)
_MSG_UNLISTED = (
    "{repository}: the saved block tree names the code file {file!r}, which its index does not list with a sha256 "
    "under '_diffblocks_code'. Save the pipeline again with diffblocks."
)
_MSG_BAD_FILE = "{repository}: the code file {file!r} {why}. Save the pipeline again with diffblocks."
_MSG_HASH = (
    "{repository}: the code file {file!r} has sha256 {actual}, but the index records {expected}: the file was "
    "changed after it was saved. Nothing was imported. Save the pipeline again, or restore the file."
)


class RemoteCodeError(PermissionError):
    """A repository's block code was refused: not trusted, not pinned, disabled, or not what its index records."""


def remote_code_disabled() -> bool:
    """Whether ``DIFFBLOCKS_NO_REMOTE_CODE`` is set to a true value."""
    return os.environ.get(ENV_NO_REMOTE_CODE, "").strip().lower() in {"1", "true", "yes", "on"}


def load_code(
    path_or_repo: str | os.PathLike[str],
    hashes: Mapping[str, str],
    files: list[str],
    *,
    trust_remote_code: bool,
    revision: str | None,
) -> dict[str, ModuleType]:
    """Check and import the code ``files`` of a repository; their modules by file.

    Args:
        path_or_repo: the repository (a folder or a Hub id), as the user named it.
        hashes: the index's record, file -> sha256.
        files: the files the tree's blocks name.
        trust_remote_code: the caller's consent.
        revision: the Hub revision the pipeline is loaded at.

    Raises:
        RemoteCodeError: refused (see the module's docstring); nothing was imported.
        RepositoryPathError: a file lies outside the repository.
    """
    repository = os.fspath(path_or_repo)
    listing = ", ".join(f"{file} (sha256 {str(hashes.get(file))[:12]}…)" for file in files)
    for file in files:
        if file not in hashes:
            raise RemoteCodeError(_MSG_UNLISTED.format(repository=repository, file=file))
        if not is_code_path(file) or not isinstance(hashes[file], str):
            raise RemoteCodeError(_MSG_BAD_FILE.format(repository=repository, file=file, why="is not a .py file path"))
    if remote_code_disabled():
        raise RemoteCodeError(_MSG_DISABLED.format(repository=repository, files=listing, env=ENV_NO_REMOTE_CODE))
    local = Path(path_or_repo).expanduser().is_dir()
    pinned = local or (revision is not None and _COMMIT.match(revision) is not None)
    if not trust_remote_code:
        fix = "trust_remote_code=True" if pinned else "trust_remote_code=True and revision='<full commit hash>'"
        raise RemoteCodeError(_MSG_UNTRUSTED.format(repository=repository, files=listing, fix=fix))
    if not pinned:
        current = _current_commit(path_or_repo, revision)
        hint = f" (the commit you have now is {current!r})" if current else ""
        fix = "revision='<full commit hash>' (40 hexadecimal digits)"
        raise RemoteCodeError(_MSG_UNPINNED.format(repository=repository, files=listing, fix=fix, current=hint))
    root = resolve_folder(path_or_repo, revision=revision, allow_patterns=files)
    verified: dict[str, Path] = {}
    for file in files:  # every file checked before any is imported
        path = contained_path(root, file, repository=repository, entry=f"code file {file!r}")
        if not path.is_file():
            raise RemoteCodeError(_MSG_BAD_FILE.format(repository=repository, file=file, why="is missing"))
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != hashes[file]:
            raise RemoteCodeError(
                _MSG_HASH.format(repository=repository, file=file, actual=actual, expected=hashes[file])
            )
        verified[file] = path
    where = revision if not local else str(root.resolve())
    return {file: _import(path, file, repository=repository, where=where, digest=hashes[file])
            for file, path in verified.items()}


def _import(path: Path, file: str, *, repository: str, where: str | None, digest: str) -> ModuleType:
    """Import ``path`` under a name private to the repository, its revision and the file's hash."""
    key = hashlib.sha256(f"{repository}\n{where}\n{file}\n{digest}".encode()).hexdigest()[:16]
    stem = re.sub(r"\W", "_", file.removesuffix(".py").replace("/", "."))
    name = f"{NAMESPACE}.r{key}.{stem}"
    if name in sys.modules:  # the same verified file of the same repository and revision: already imported
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    setattr(module, CODE_ATTRIBUTE, file)
    sys.modules[name] = module  # classes find their module by name (annotations, pydantic)
    try:
        spec.loader.exec_module(module)
    except BaseException as err:
        del sys.modules[name]
        err.add_note(f"raised while importing the block code {file!r} of {repository} (verified against its sha256)")
        raise
    return module


def _current_commit(path_or_repo: str | os.PathLike[str], revision: str | None) -> str | None:
    """The commit of the snapshot ``revision`` resolves to now, to suggest pinning it (None if unknown)."""
    try:
        root = resolve_folder(path_or_repo, revision=revision, allow_patterns=["modular_model_index.json"])
    except (FileNotFoundError, ValueError):
        return None
    return root.name if _COMMIT.match(root.name) else None


def code_class(modules: Mapping[str, ModuleType], file: str, qualname: str) -> type:
    """The class ``qualname`` in the module imported from ``file``.

    Raises:
        ValueError: the module has no such class.
    """
    value: object = modules[file]
    for part in qualname.split("."):
        value = getattr(value, part, None)
    if not isinstance(value, type):
        raise ValueError(f"the code file {file!r} has no class {qualname!r}")
    return value


__all__ = ["ENV_NO_REMOTE_CODE", "RemoteCodeError", "code_class", "load_code", "remote_code_disabled"]
