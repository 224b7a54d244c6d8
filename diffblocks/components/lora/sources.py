"""Where a LoRA's file came from, pinned: a local file, or a file of a Hub repository at a commit, with its sha256.

A :class:`LoRASource` is what a saved preset records so that loading finds the same bytes again
(see :mod:`diffblocks.presets.loras`). :func:`resolve_lora_file` turns what a user passes to
``load_lora_weights`` (a file, a folder, a Hub id) into the file and its source; a Hub file is
pinned to the commit of the cache snapshot it was read from, whatever branch was asked for.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import final

from diffblocks.components.containment import contained_path, is_hub_id
from diffblocks.components.hub import resolve_folder

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_MSG_HASH = (
    "{file}: its sha256 is {actual}, but {where} records {expected} for {kind} {name!r}. The file changed since "
    "it was recorded (or was replaced); nothing was loaded. Load the {kind} again from a file you trust and save anew."
)


@final
@dataclass(frozen=True, slots=True)
class LoRASource:
    """A LoRA file's origin and content hash (a textual inversion file's too: they are pinned alike).

    Args:
        file: the local file's path (``repo`` None), or the file's name inside ``repo``.
        sha256: the hex sha256 of the file's bytes.
        repo: the Hub repository id, for a file read from the Hub.
        revision: the commit the Hub file was read at (40 hex digits), so that it is found again.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "style.safetensors"
        >>> _ = path.write_bytes(b"lora")
        >>> LoRASource.of_file(path).sha256[:12]
        'd339f720de1f'
    """

    file: str
    sha256: str
    repo: str | None = None
    revision: str | None = None

    @classmethod
    def of_file(cls, path: Path, *, repo: str | None = None, name: str | None = None, revision: str | None = None) -> LoRASource:
        """The source of ``path``, hashed now; a Hub file records its ``name`` inside ``repo``."""
        return cls(name if repo is not None and name is not None else os.fspath(path), file_sha256(path), repo, revision)

    def check(self, path: Path, *, name: str, where: str, kind: str = "LoRA") -> None:
        """Raise ValueError naming ``path`` unless its bytes hash to :attr:`sha256`; ``kind`` names what the file holds."""
        actual = file_sha256(path)
        if actual != self.sha256:
            raise ValueError(_MSG_HASH.format(file=path, actual=actual, where=where, expected=self.sha256, name=name, kind=kind))


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_lora_file(
    path_or_repo: str | os.PathLike[str],
    weight_name: str | None = None,
    *,
    revision: str | None = None,
    default: str = DEFAULT_WEIGHT_NAME,
    kind: str = "LoRA file",
) -> tuple[Path, LoRASource]:
    """The LoRA file that ``path_or_repo`` names, and its source.

    Args:
        path_or_repo: a file, a folder, or a Hub repository id.
        weight_name: the file inside the folder or repository (default ``default``).
        revision: a Hub branch, tag or commit; the source records the commit actually read.
        default: the file's name when ``weight_name`` is None (another for textual inversion's files).
        kind: what the file holds, for the error when it is missing.

    Raises:
        RepositoryPathError: ``weight_name`` leads out of the folder or repository.
        FileNotFoundError: the file or repository cannot be found.
    """
    local = Path(path_or_repo).expanduser()
    if local.is_file():
        return local, LoRASource.of_file(local)
    wanted = weight_name or default
    folder = resolve_folder(path_or_repo, revision=revision, allow_patterns=[wanted])
    path = contained_path(folder, wanted, repository=str(path_or_repo), entry="weight_name")
    if not path.is_file():
        raise FileNotFoundError(f"{str(path_or_repo)!r} has no {kind} {wanted!r} (looked in {folder})")
    commit = snapshot_commit(folder)
    if local.is_dir() or not is_hub_id(str(path_or_repo)) or commit is None:
        return path, LoRASource.of_file(path)  # a local file (a Hub file not pinned to a commit is kept as one)
    return path, LoRASource.of_file(path, repo=str(path_or_repo), name=wanted, revision=commit)


def snapshot_commit(folder: Path) -> str | None:
    """The commit of a Hugging Face cache snapshot folder (``.../snapshots/<commit>``), else None."""
    return folder.name if folder.parent.name == "snapshots" and _COMMIT.match(folder.name) else None


__all__ = ["DEFAULT_WEIGHT_NAME", "LoRASource", "file_sha256", "resolve_lora_file", "snapshot_commit"]
