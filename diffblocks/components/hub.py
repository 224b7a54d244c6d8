"""Find a repository's files: a local folder, or a Hub id resolved through the local cache.

Every loader (models, schedulers, guiders, the components manager) goes through
:func:`resolve_folder`, so Hub ids, revisions, the cache and ``HF_HUB_OFFLINE`` behave the same
everywhere, and no repository reaches outside itself (see :mod:`diffblocks.components.containment`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from diffblocks.components.containment import check_folder, check_subfolder, contained_path

_MSG_NOT_FOUND = (
    "{what!r} is neither a local folder nor a repository in the Hugging Face cache{rev}. "
    "Pass a folder path, or download the repository first (`hf download {what}`); "
    "with HF_HUB_OFFLINE=1 only the cache is searched."
)


def is_offline() -> bool:
    """True when the Hub must not be contacted (``HF_HUB_OFFLINE`` is set to a true value)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_folder(
    path_or_repo: str | os.PathLike[str],
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    allow_patterns: Sequence[str] | None = None,
) -> Path:
    """Return the local folder holding ``path_or_repo`` (and ``subfolder`` inside it).

    Args:
        path_or_repo: a local directory, or a Hub repository id such as ``"org/name"``.
        subfolder: a folder inside the repository (``"unet"``, ``"scheduler"``, ...).
        revision: a branch, tag or commit for Hub ids; ignored for local folders.
        allow_patterns: file patterns to fetch from the Hub, relative to the repository root;
            defaults to everything under ``subfolder``.

    Raises:
        FileNotFoundError: the folder, repository or subfolder cannot be found locally and the
            Hub is unreachable or disabled.
        RepositoryPathError: ``subfolder``, or a file or link in the folder, leads out of the repository.
    """
    name = str(path_or_repo)
    if subfolder:
        check_subfolder(subfolder, repository=name, entry="subfolder")  # before anything is downloaded
    local = Path(path_or_repo).expanduser()
    if local.is_dir():
        root = local
    else:
        if allow_patterns is None and subfolder:
            allow_patterns = [f"{subfolder}/*", "*.json"]
        try:
            root = Path(
                snapshot_download(
                    name,
                    revision=revision,
                    allow_patterns=list(allow_patterns) if allow_patterns else None,
                    local_files_only=is_offline(),
                )
            )
        except (LocalEntryNotFoundError, OSError, ValueError) as err:
            rev = f" at revision {revision!r}" if revision else ""
            raise FileNotFoundError(_MSG_NOT_FOUND.format(what=name, rev=rev)) from err
    folder = contained_path(root, subfolder, repository=name, entry="subfolder") if subfolder else root
    if not folder.is_dir():
        raise FileNotFoundError(f"{name!r} has no subfolder {subfolder!r} (looked in {root}).")
    check_folder(folder, root, repository=name, patterns=allow_patterns)
    return folder
