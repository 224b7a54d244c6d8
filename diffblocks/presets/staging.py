"""Write a save beside its target folder, then move in only what it wrote.

A save is first written into a hidden folder beside the target (the same filesystem, so that
moving is renaming). Once every file is written, the save's files are moved into the target,
replacing the previous save's files of the same names, and the previous save's files that this
save no longer writes are removed. Nothing else in the target is touched: notes, images, a
``.git`` stay where they are.

Which files a previous save wrote is read from its ``modular_model_index.json``: the list it
recorded under ``_diffblocks_files``, or, for saves made before that list existed, the files in
the component subfolders its index names and the two index files. Only plain files inside the
folder, reached through no link and under no hidden folder, are ever taken as a previous save's.

Files about to be replaced or removed are first moved into a second hidden folder, so that a move
that fails puts the previous save back as it was; both hidden folders are removed in every case.
A target that is a symbolic link to a folder is written through: the link stays, and the folder
it points to receives the save.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from diffblocks.components.specs import CLASSIC_INDEX, MODULAR_INDEX

MANIFEST_KEY = "_diffblocks_files"

_MSG_BROKEN_LINK = "{target} is a symbolic link to {link!r}, which does not exist; create that folder or save elsewhere."
_MSG_THROUGH_LINK = (
    "{path} is {what}; saving would {action}. Remove it, or save into another folder (nothing was changed)."
)
_MSG_NOT_RESTORED = (
    "saving into {target} failed ({err}) and the previous save could not be put back ({again}); "
    "its files are in {backup}: move them back by hand."
)


def saved_files(folder: Path) -> list[str]:
    """Every plain file under ``folder``, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def previous_save(folder: Path) -> set[str]:
    """The files of ``folder`` that a previous diffblocks save wrote (empty if it holds none)."""
    try:
        index = json.loads((folder / MODULAR_INDEX).read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(index, dict) or "_diffblocks_version" not in index:
        return set()
    listed = index.get(MANIFEST_KEY)
    if isinstance(listed, list):
        names = {name for name in listed if isinstance(name, str)}
    else:  # saved before the list was recorded: its index files and its component subfolders
        names = {MODULAR_INDEX, CLASSIC_INDEX}
        for entry in index.values():
            spec = entry[2] if isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], dict) else {}
            subfolder = spec.get("subfolder")
            if spec.get("pretrained_model_name_or_path") is None and isinstance(subfolder, str) and subfolder:
                names.update(f"{subfolder}/{name}" for name in _safe_listing(folder, subfolder))
    return {name for name in names if _is_own_file(folder, name)}


def _safe_listing(folder: Path, subfolder: str) -> list[str]:
    path = folder / subfolder
    return saved_files(path) if _is_inside(folder, path) and path.is_dir() else []


def _is_inside(folder: Path, path: Path) -> bool:
    # the path exactly as named, no link on the way: what is removed is what the save wrote
    return path.resolve() == folder.resolve() / path.relative_to(folder) and ".." not in path.relative_to(folder).parts


def _is_own_file(folder: Path, name: str) -> bool:
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or "\\" in name or any(p.startswith(".") for p in parts):
        return False  # a save writes no hidden files, so .git and the like are never a save's
    path = folder / name
    return path.is_file() and not path.is_symlink() and _is_inside(folder, path)


@contextlib.contextmanager
def staged_save(target: Path, *, replace_all: bool = False) -> Iterator[Path]:
    """A hidden folder beside ``target`` to write a save into; moved into ``target`` on success.

    Args:
        target: the folder to save into (created if missing).
        replace_all: remove everything in ``target`` that this save does not write, not only a
            previous save's files (``save_pretrained(..., overwrite=True)`` on a foreign folder).

    Raises:
        FileExistsError: ``target`` is a broken link, or a path the save writes is a link or of
            the wrong kind in ``target``; raised before anything in ``target`` changes.
    """
    real = _resolve_target(target)
    real.parent.mkdir(parents=True, exist_ok=True)
    staging = real.with_name(f".{real.name}.saving-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        if real.exists():
            _move_in(staging, real, replace_all=replace_all)
        else:
            os.replace(staging, real)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _resolve_target(target: Path) -> Path:
    if target.is_symlink():
        if not target.exists():
            raise FileExistsError(_MSG_BROKEN_LINK.format(target=target, link=os.readlink(target)))
        return target.resolve()
    return target


def _move_in(staging: Path, real: Path, *, replace_all: bool) -> None:
    new = saved_files(staging)
    if replace_all:
        aside = sorted(p.name for p in real.iterdir())
    else:
        _check_paths(real, new)
        replaced = {name for name in new if (real / name).is_file() or (real / name).is_symlink()}
        aside = sorted(previous_save(real) | replaced)
    folders = {parent for name in new for parent in Path(name).parents if parent != Path(".")}
    existing = {folder for folder in folders if (real / folder).is_dir()}
    backup = real.with_name(f".{real.name}.previous-{uuid.uuid4().hex[:8]}")
    moved_aside: list[str] = []
    moved_in: list[str] = []
    keep_backup = False
    try:
        _move(aside, real, backup, done=moved_aside)
        _move(new, staging, real, done=moved_in)
    except BaseException as err:
        try:
            _move(reversed(moved_in), real, staging, done=[])
            _move(reversed(moved_aside), backup, real, done=[])
        except OSError as again:
            keep_backup = True
            raise OSError(_MSG_NOT_RESTORED.format(target=real, err=err, again=again, backup=backup)) from err
        finally:
            for folder in sorted(folders - existing, key=lambda f: len(f.parts), reverse=True):
                with contextlib.suppress(OSError):
                    (real / folder).rmdir()  # made for this save's files; kept if anything is in it
        raise
    finally:
        if not keep_backup:
            shutil.rmtree(backup, ignore_errors=True)
    _remove_empty_folders(real, [name for name in aside if name not in set(new)])


def _move(names: Iterable[str], source: Path, destination: Path, *, done: list[str]) -> None:
    for name in names:
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(source / name, destination / name)
        done.append(name)


def _check_paths(real: Path, new: list[str]) -> None:
    """Refuse, before anything moves, to write through a link or onto a folder of the same name."""
    for name in new:
        path = real
        for part in Path(name).parts[:-1]:
            path = path / part
            if path.is_symlink():
                what = f"a symbolic link to {path.resolve()}"
                raise FileExistsError(_MSG_THROUGH_LINK.format(path=path, what=what, action="write through it"))
            if path.exists() and not path.is_dir():
                raise FileExistsError(_MSG_THROUGH_LINK.format(path=path, what="a file", action="need a folder there"))
        if (real / name).is_dir() and not (real / name).is_symlink():
            what = "a folder"
            raise FileExistsError(_MSG_THROUGH_LINK.format(path=real / name, what=what, action="need a file there"))


def _remove_empty_folders(real: Path, names: Iterable[str]) -> None:
    """Remove the folders that ``names`` left empty (a component's subfolder this save no longer has)."""
    for name in names:
        for parent in Path(name).parents:
            if parent == Path("."):
                break
            with contextlib.suppress(OSError):
                (real / parent).rmdir()  # fails, and stops nothing, when the folder still holds files


__all__ = ["MANIFEST_KEY", "previous_save", "saved_files", "staged_save"]
