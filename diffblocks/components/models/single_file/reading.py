"""Open a single-file checkpoint: a local file or a file of a Hub repository, safetensors first.

The header is read first (keys and shapes, no tensors), so the layout is told and the config
inferred before any weight is read; tensors are then read part by part. Pickled checkpoints
(``.ckpt``, ``.pt``, ``.bin``) are read only on explicit opt-in, with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from torch import Tensor

from diffblocks.components.containment import check_subfolder, is_hub_id
from diffblocks.components.hub import is_offline
from diffblocks.components.models.loading import CheckpointError

_PICKLES = (".ckpt", ".pt", ".pth", ".bin")
_HUB_URL = re.compile(r"https://huggingface\.co/(?P<repo>[^/]+/[^/]+)/(blob|resolve)/(?P<revision>[^/]+)/(?P<file>.+)")

_MSG_PICKLE = (
    "{path} is a pickle checkpoint. diffblocks reads safetensors by default because unpickling can run "
    "arbitrary code. Use the .safetensors release of the model, or, if you trust the source, pass "
    "allow_pickle=True (the file is then read with torch.load(weights_only=True), which loads tensors only)."
)
_MSG_CORRUPT = (
    "cannot read {path}: {err}. The file is truncated or corrupt (an interrupted download?); "
    "delete it and download it again."
)
_MSG_NOT_FOUND = (
    "{what!r} is neither a local file nor a file of a Hub repository in the cache ('owner/name/file.safetensors' "
    "or a huggingface.co URL); with HF_HUB_OFFLINE=1 only the cache is searched."
)


def resolve_file(path_or_hub_file: str | os.PathLike[str], *, revision: str | None = None) -> Path:
    """The local path of a checkpoint: a file, ``owner/name/path/in/repo.safetensors`` or a Hub URL.

    Raises:
        FileNotFoundError: neither a local file nor a Hub file that can be fetched (or is cached).
        RepositoryPathError: the file named inside a repository leads out of it.
    """
    local = Path(path_or_hub_file).expanduser()
    if local.is_file():
        return local
    name = str(path_or_hub_file)
    url = _HUB_URL.fullmatch(name)
    if url:
        repo, filename, revision = url["repo"], url["file"], revision or url["revision"]
    else:
        owner, _, rest = name.partition("/")
        repo_name, _, filename = rest.partition("/")
        repo = f"{owner}/{repo_name}"
        if not filename or not is_hub_id(repo):
            raise FileNotFoundError(_MSG_NOT_FOUND.format(what=name))
    check_subfolder(filename, repository=repo, entry="file")
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, local_files_only=is_offline()))
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        raise FileNotFoundError(_MSG_NOT_FOUND.format(what=name)) from err


class SingleFile:
    """A checkpoint's keys and shapes, and its tensors on demand.

    Args:
        path: a ``.safetensors`` file, or a pickle when ``allow_pickle``.
        allow_pickle: read pickles (``torch.load(weights_only=True)``; a ``state_dict`` entry is unwrapped).

    Raises:
        CheckpointError: a pickle without ``allow_pickle``, or a truncated or corrupt file.
    """

    def __init__(self, path: Path, *, allow_pickle: bool = False) -> None:
        self.path = path
        self._state: dict[str, Tensor] | None = None
        if path.suffix in _PICKLES:
            if not allow_pickle:
                raise CheckpointError(_MSG_PICKLE.format(path=path))
            self._state = _load_pickle(path)
            self.shapes = {key: tuple(t.shape) for key, t in self._state.items()}
            return
        try:
            with safe_open(str(path), framework="pt") as f:
                self.shapes: dict[str, tuple[int, ...]] = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except (SafetensorError, OSError) as err:
            raise CheckpointError(_MSG_CORRUPT.format(path=path, err=err)) from err

    def tensors(self, keys: Iterable[str], *, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """The tensors of ``keys``, read now."""
        if self._state is not None:
            return {key: self._state[key].to(device) for key in keys}
        try:
            with safe_open(str(self.path), framework="pt", device=str(device)) as f:
                return {key: f.get_tensor(key) for key in keys}
        except (SafetensorError, OSError) as err:
            raise CheckpointError(_MSG_CORRUPT.format(path=self.path, err=err)) from err


def _load_pickle(path: Path) -> dict[str, Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True) refused it, as it holds objects other than tensors and plain "
            f"values{_unsupported(err)}. diffblocks does not unpickle arbitrary objects; convert the file "
            "to safetensors where you trust it."
        ) from err
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError for damaged files
        raise CheckpointError(_MSG_CORRUPT.format(path=path, err=err)) from err
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # Lightning checkpoints, as LDM saved them
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors")
    return {str(key): value for key, value in loaded.items() if isinstance(value, Tensor)}


def _unsupported(err: Exception) -> str:
    """torch's line naming the object it would not build (its message is long and has terminal colours)."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return f" (it names {found[1]})" if found else ""


__all__ = ["SingleFile", "resolve_file"]
