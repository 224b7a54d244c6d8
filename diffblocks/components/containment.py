"""What a repository may name: files and folders inside itself, and other repositories by Hub id only.

A repository (a local folder, or a Hub snapshot in the local cache) names paths in its index
files (component subfolders), in weight indexes (shard files) and, through symbolic links, in its
folder tree. Each name is resolved here against the repository's root and refused if it leaves
it, so that a downloaded repository cannot make us read files of this machine (which a later
``push_to_hub`` would then upload). The resolved *real* path is checked, so a link inside the
repository that points out of it is refused like a ``../`` would be.

In the Hugging Face cache, a snapshot's files are links into the repository's ``blobs`` folder,
which therefore counts as inside the repository.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath, PureWindowsPath

from diffblocks.components.config_files import read_json_object

# the scheme that presets resolve to a folder inside an installed package (see
# diffblocks.presets.loading.resolve_package_reference, which checks the path part)
PACKAGE_SCHEME = "package://"
# huggingface_hub's repository names: letters, digits, "-", "_" and "." (no "--" or ".."), at most 96 characters
_HUB_NAME = re.compile(r"^[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?$")
_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# diffusers' and transformers' weight indexes: model.safetensors.index.json, *.safetensors.index.fp16.json,
# *.safetensors.fp16.index.json, and the same for .bin
_WEIGHT_INDEX = re.compile(r"\.(?P<ext>safetensors|bin)\.(?:[^.]+\.)?index(?:\.[^.]+)?\.json$")

_INSIDE_ONLY = (
    "A repository may only name files and folders inside itself, so that a downloaded repository cannot "
    "read files of this machine. If you trust what it points to, copy it into the repository, or load that "
    "component yourself and pass it with from_pretrained(..., components={name: ...})."
)
_INSIDE_ONLY_LITERAL = _INSIDE_ONLY.replace("{", "{{").replace("}", "}}")
_MSG_OUTSIDE = "{repository}: {entry} names {name!r}, which {why}. " + _INSIDE_ONLY_LITERAL
_MSG_LINK = "{repository}: {name!r} {why}. " + _INSIDE_ONLY_LITERAL
_MSG_REFERENCE = (
    "{repository}: {entry} names {value!r} as the repository to load from, which {why}. An index may name "
    "another repository only by its Hub id ('owner/name') or as package://<module>/<path>, never by a local "
    "path, so that a downloaded repository cannot load files of this machine. Replace it with the Hub id, or "
    "load the component yourself: from_pretrained(..., components={{{name!r}: ComponentSpec(repo=..., ...)}})."
)
_MSG_SHARD = (
    "{repository}: {index} names the shard {name!r}, which {why}. A weight index may only name "
    "{ext} files in its own folder."
)


class RepositoryPathError(ValueError):
    """A repository names a path outside itself, or another repository by something other than a Hub id."""


def _why_not_relative(name: str) -> str | None:
    """Why ``name`` cannot be a path inside a folder, whatever the folder holds (None: it can)."""
    if "\x00" in name:
        return "contains a NUL character"
    if "\\" in name:
        return "contains a backslash, which acts as a separator on Windows"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute():
        return "is an absolute path"
    if PureWindowsPath(name).drive:
        return "starts with a drive letter"
    if ".." in PurePosixPath(name).parts:
        return "has a '..' segment that leaves the repository"
    return None


def _real_roots(root: Path) -> tuple[Path, ...]:
    """The real folders that files of ``root`` may resolve into: ``root``, and a Hub snapshot's ``blobs``."""
    real = root.resolve()
    for folder in (root, *root.parents):
        if folder.parent.name == "snapshots" and re.match(r"^(models|datasets|spaces)--", folder.parent.parent.name):
            return real, (folder.parent.parent / "blobs").resolve()
    return (real,)


def _why_outside(path: Path, roots: tuple[Path, ...]) -> str | None:
    real = path.resolve()
    if any(real == r or real.is_relative_to(r) for r in roots):
        return None
    return f"is a symbolic link to {real}, outside the repository"


def contained_path(root: Path, name: str, *, repository: str, entry: str) -> Path:
    """``root / name``, refused if ``name`` or a symbolic link on its way leaves ``root``.

    Args:
        root: the repository's folder (a local folder, or a snapshot in the Hub cache).
        name: a relative path the repository gives (a subfolder, a file).
        repository: how the user named the repository (a path or a Hub id), for the message.
        entry: where the name was found (``"model_index.json entry 'unet', subfolder"``), for the message.

    Raises:
        RepositoryPathError: ``name`` is absolute, has a drive letter, a ``..`` segment or a backslash,
            or resolves (through links) outside ``root``.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> contained_path(root, "unet", repository="org/model", entry="subfolder") == root / "unet"
        True
        >>> contained_path(root, "../private", repository="org/model", entry="subfolder")
        Traceback (most recent call last):
        ...
        diffblocks.components.containment.RepositoryPathError: org/model: subfolder names '../private', ...
    """
    why = _why_not_relative(name)
    path = root / name
    if why is None:
        why = _why_outside(path, _real_roots(root))
    if why is not None:
        raise RepositoryPathError(_MSG_OUTSIDE.format(repository=repository, entry=entry, name=name, why=why))
    return path


def check_folder(folder: Path, root: Path, *, repository: str, patterns: Sequence[str] | None = None) -> None:
    """Refuse ``folder`` if it, a file in it, or a shard its weight indexes name leaves ``root``.

    Loaders read the files directly in a component folder (configs, weights, tokenizer files), and
    transformers follows its own weight indexes, so these are checked before any is read. Folders
    inside ``folder`` are checked when they are loaded from, as subfolders.

    Args:
        folder: ``root`` or a folder inside it.
        root: the repository's folder.
        repository: how the user named the repository, for the message.
        patterns: check only the files whose path in ``root`` matches one of these (as the Hub's
            ``allow_patterns``: the files a loader reads); all files when None.

    Raises:
        RepositoryPathError: as :func:`contained_path`, or a weight index names a shard that is not a
            file of its own extension in ``folder`` (a pickle named by a safetensors index, say).
    """
    roots = _real_roots(root)
    files = [path for path in sorted(folder.iterdir()) if not path.is_dir()]
    if patterns is not None:
        files = [path for path in files if any(fnmatchcase(_relative(path, root), p) for p in patterns)]
    for path in (folder, *files):
        why = _why_outside(path, roots)
        if why is not None:
            raise RepositoryPathError(_MSG_LINK.format(repository=repository, name=_relative(path, root), why=why))
        if path.is_file() and _WEIGHT_INDEX.search(path.name):
            try:
                weight_map = read_json_object(path, what="a weight index")["weight_map"]
            except (ValueError, KeyError, TypeError):
                continue  # a broken index is reported, with its file, by the loader that reads it
            if isinstance(weight_map, dict):
                check_shard_names(path, [str(name) for name in weight_map.values()], repository=repository)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def check_shard_names(index: Path, names: list[str], *, repository: str) -> list[Path]:
    """The shard files a weight index names, each a file of the index's own extension in its folder.

    Raises:
        RepositoryPathError: a name has a separator, is not of the index's extension (a safetensors
            index may not name pickles), or resolves outside the index's folder.
    """
    match = _WEIGHT_INDEX.search(index.name)
    ext = f".{match['ext']}" if match else Path(index.name.removesuffix(".index.json")).suffix
    shards: list[Path] = []
    for name in dict.fromkeys(names):
        why = _why_not_relative(name)
        if why is None and len(PurePosixPath(name).parts) != 1:
            why = "is not a file name in the index's folder"
        if why is None and not name.endswith(ext):
            pickle = name.endswith(_PICKLES)
            why = f"is not a {ext} file" + (" (pickles can run code when loaded)" if pickle else "")
        if why is None:
            why = _why_outside(index.parent / name, _real_roots(index.parent))
        if why is not None:
            raise RepositoryPathError(
                _MSG_SHARD.format(repository=repository, index=index.name, name=name, why=why, ext=ext)
            )
        shards.append(index.parent / name)
    return shards


def is_hub_id(value: str) -> bool:
    """Whether ``value`` is an explicit Hub repository id, ``owner/name``."""
    parts = value.split("/")
    return len(parts) == 2 and all(_HUB_NAME.match(p) and ".." not in p and "--" not in p for p in parts)


def check_reference(value: str, *, repository: str, entry: str, name: str) -> None:
    """Refuse an index entry's ``pretrained_model_name_or_path`` unless it is a Hub id or a package reference.

    A Hub id that is also a folder under the working directory is refused too: loaders try local
    folders first, so that folder would be read instead of the Hub repository.

    Raises:
        RepositoryPathError: ``value`` is a local path, an ambiguous Hub id, or not a repository name at all.
    """
    if value.startswith(PACKAGE_SCHEME):
        return  # resolved, and kept inside its package, by presets.loading.resolve_package_reference
    why = None
    if not is_hub_id(value):
        why = _why_not_relative(value) or "is a local path, or not a Hub id of the form 'owner/name'"
    elif Path(value).exists():
        why = f"is also a path under the working directory ({Path(value).absolute()}), which would be read instead"
    if why is not None:
        raise RepositoryPathError(
            _MSG_REFERENCE.format(repository=repository, entry=entry, value=value, why=why, name=name)
        )


def check_subfolder(value: str, *, repository: str, entry: str) -> None:
    """Refuse a subfolder that could not be inside any folder (absolute, ``..``, drive, backslash).

    Used where the repository's files are not on disk yet (an index read from the Hub); the real
    path is checked by :func:`contained_path` once they are.
    """
    why = _why_not_relative(value)
    if why is not None:
        raise RepositoryPathError(_MSG_OUTSIDE.format(repository=repository, entry=entry, name=value, why=why))


__all__ = [
    "PACKAGE_SCHEME",
    "RepositoryPathError",
    "check_folder",
    "check_reference",
    "check_shard_names",
    "check_subfolder",
    "contained_path",
    "is_hub_id",
]
