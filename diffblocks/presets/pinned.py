"""Files a saved preset names, pinned: recorded by path and sha256, and found and checked again when it loads.

LoRAs (:mod:`~diffblocks.presets.loras`), textual inversion embeddings
(:mod:`~diffblocks.presets.embeddings`) and IP-Adapters (:mod:`~diffblocks.presets.ip_adapters`) are
recorded alike. A file read from the Hub stays a reference to its repository at the commit it was
read from; a local one is copied into the saved folder, so that the folder stands on its own and
``push_to_hub`` uploads it (:func:`pin`, :func:`copy_pinned`). Loading finds every file inside the
repository that names it (:mod:`diffblocks.components.containment`) and checks its sha256 before
a tensor is read (:func:`resolve_pinned`).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from diffblocks.components.containment import RepositoryPathError, contained_path, is_hub_id
from diffblocks.components.hub import resolve_folder
from diffblocks.components.lora import LoRASource

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_MSG_REPO = (
    "{repository}: the modular index's {key} entry {name!r} names {repo!r} as the {kind}'s repository, which is not a Hub "
    "id ('owner/name'), or is also a folder under the working directory. An index names other repositories by Hub id "
    "only, so that a downloaded repository cannot read files of this machine; nothing was loaded."
)


def pin(source: LoRASource, *, name: str, folder: str, kind: str, where: str, pickle_error: str) -> tuple[LoRASource, Path | None]:
    """What a saved preset records for the file ``source`` names, and the local file to copy for it (None: a Hub file).

    A local file is saved as ``folder/<name>.safetensors`` (its hash's first 16 digits when ``name``
    is not a safe file name).

    Args:
        source: where the file was read from.
        name, kind, where: the record's name, what the file holds and where it was attached, for errors.
        folder: the saved folder's subfolder for local files (``loras``, ``embeddings``).
        pickle_error: the message to raise for a local pickle, which a preset does not hold.

    Raises:
        ValueError: a local file is a pickle, or its bytes changed since it was read (named).
    """
    if source.repo is not None:
        return source, None
    path = Path(source.file)
    if path.suffix != ".safetensors":
        raise ValueError(pickle_error)
    source.check(path, name=name, where=where, kind=kind)
    return LoRASource(f"{folder}/{name if _SAFE_NAME.match(name) else source.sha256[:16]}.safetensors", source.sha256), path


def copy_pinned(staging: Path, copies: Mapping[str, Path]) -> None:
    """Copy the local files a preset records into the folder being saved (saved path -> file)."""
    for saved, path in copies.items():
        (staging / saved).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, staging / saved)


def resolve_pinned(
    path_or_repo: str | os.PathLike[str],
    file: str,
    sha256: str,
    repo: str | None,
    pinned: str | None,
    *,
    revision: str | None,
    key: str,
    name: str,
    kind: str,
) -> tuple[Path, LoRASource]:
    """A recorded file (in the preset's repository, or in ``repo`` at commit ``pinned``), found inside it and its hash checked.

    Args:
        path_or_repo, revision: the preset's folder or repository, and the revision it is read at.
        file, sha256, repo, pinned: the record: the file, its hash, and the Hub repository and commit that
            hold it (None: the preset's own repository).
        key, name, kind: the index entry, the record's name in it and what the file holds, for errors.

    Returns:
        The file, and the source to record should the pipeline be saved again.

    Raises:
        RepositoryPathError: the file leads out of its repository, or ``repo`` is not a Hub id.
        FileNotFoundError: the repository has no such file.
        ValueError: the file's sha256 is not the recorded one.
    """
    repository = str(path_or_repo)
    entry = f"{key} entry {name!r}, file"
    if repo is None:
        root = resolve_folder(path_or_repo, revision=revision, allow_patterns=[file])
        path = contained_path(root, file, repository=repository, entry=entry)
        source = LoRASource(os.fspath(path), sha256)  # a copy of the folder's file, should it be saved again
    else:
        if not is_hub_id(repo) or Path(repo).exists():
            raise RepositoryPathError(_MSG_REPO.format(repository=repository, key=key, name=name, repo=repo, kind=kind))
        root = resolve_folder(repo, revision=pinned, allow_patterns=[file])
        path = contained_path(root, file, repository=repo, entry=entry)
        source = LoRASource(file, sha256, repo, pinned)
    if not path.is_file():
        raise FileNotFoundError(f"{repository}: {entry} names {file!r}, which is not in the repository")
    LoRASource(os.fspath(path), sha256).check(path, name=name, where=f"{repository}'s {key}", kind=kind)
    return path, source


__all__ = ["copy_pinned", "pin", "resolve_pinned"]
