"""Textual inversion embeddings saved with a preset: a pinned, hashed reference per token, added again when it loads.

``save_pretrained`` records every embedding that ``load_textual_inversion`` added to a text encoder
in the modular index, under ``_diffblocks_textual_inversions``, in the order they were added::

    [{"token": "<cat>", "file": "embeddings/<cat>.safetensors", "sha256": "9f2c...", "repo": null, "revision": null},
     {"token": "ink", "file": "ink.safetensors", "sha256": "51d0...", "repo": "someone/ink-style", "revision": "<40 hex digits>"}]

as LoRAs are recorded (:mod:`diffblocks.presets.loras`): a local file is copied into the saved
folder (``embeddings/``), a Hub file stays a reference to its repository at the commit it was read
from. The tokenizers and text encoders are saved without the embeddings' tokens and rows (as they
were before them), so that loading adds them again from the recorded files, found inside their
repository and their sha256 checked before a tensor is read: the same tokens, ids and vectors,
the same image.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from diffblocks.blocks import Pipeline
from diffblocks.blocks.textual_inversion import ENCODER_TOKENIZERS, sources_of
from diffblocks.components.compiled import unwrap_compiled
from diffblocks.components.lora import LoRASource
from diffblocks.components.textual_inversion import Embedding, without_tokens
from diffblocks.presets.pinned import pin, resolve_pinned

EMBEDDINGS_KEY = "_diffblocks_textual_inversions"
EMBEDDING_FOLDER = "embeddings"

_MSG_NO_SOURCE = (
    "textual inversion {token!r} was added from tensors (add_textual_inversion without a source), not read from a "
    "file, so a saved preset cannot record it. Save it as a .safetensors file and load it with "
    "pipe.load_textual_inversion(path), or remove it (pipe.unload_textual_inversion({token!r})) before saving."
)
_MSG_PICKLE = (
    "textual inversion {token!r} was read from the pickle {file}; a saved preset holds safetensors files only. Convert it "
    "(safetensors.torch.save_file({{{token!r}: vectors}}, 'embedding.safetensors'), the vectors as the pipeline holds them) "
    "and load that instead."
)
_MSG_BAD_ENTRY = "{repository}: the modular index's {key} is not a list of textual inversion references ({err}); nothing was loaded."


class EmbeddingReference(BaseModel):
    """One embedding of a saved preset: its token and file (in the preset's repository, or in ``repo`` at ``revision``).

    Args:
        token: the token it was added under (the file's, or the ``token=`` given when loading).
        file: a path inside the preset's folder (``repo`` None), or inside ``repo``.
        sha256: the file's hash, checked before it is read.
        repo: a Hub repository id, for an embedding kept as a reference.
        revision: the commit of ``repo`` the file was read at.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    token: str = Field(min_length=1)
    file: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    repo: str | None = None
    revision: str | None = Field(default=None, pattern=r"^[0-9a-f]{40}$")


def embedding_pairs(pipe: Pipeline) -> dict[str, tuple[Any, Any]]:
    """Text encoder name -> (its tokenizer, the encoder), for the loaded pairs: an embedding lives in a loaded encoder."""
    keys = pipe.component_keys()
    pairs: dict[str, tuple[Any, Any]] = {}
    for encoder, tokenizer in ENCODER_TOKENIZERS.items():
        if encoder in keys and tokenizer in keys and all(pipe.manager.is_loaded(keys[n]) for n in (encoder, tokenizer)):
            pairs[encoder] = (pipe.manager.get(keys[tokenizer]), unwrap_compiled(pipe.manager.get(keys[encoder])))
    return pairs


def embedding_references(pipe: Pipeline) -> tuple[list[EmbeddingReference], dict[str, Path]]:
    """The references to record for ``pipe``'s embeddings, and the local files to copy (saved path -> file).

    An embedding in two encoders (an SDXL ``clip_l``/``clip_g`` file) is one reference.

    Raises:
        ValueError: an embedding has no file, was read from a pickle, or its file changed since (named).
    """
    references: list[EmbeddingReference] = []
    copies: dict[str, Path] = {}
    seen: set[str] = set()
    for tokenizer, encoder in embedding_pairs(pipe).values():
        for token, source in sources_of(encoder, tokenizer).items():
            if token in seen:
                continue
            seen.add(token)
            if source is None:
                raise ValueError(_MSG_NO_SOURCE.format(token=token))
            pinned, local = pin(
                source, name=token, folder=EMBEDDING_FOLDER, kind="textual inversion", where="the loaded embedding",
                pickle_error=_MSG_PICKLE.format(token=token, file=Path(source.file)),
            )
            if local is not None:
                copies[pinned.file] = local
            references.append(
                EmbeddingReference(token=token, file=pinned.file, sha256=pinned.sha256, repo=pinned.repo, revision=pinned.revision)
            )
    return references, copies


@contextlib.contextmanager
def detached_embeddings(pipe: Pipeline) -> Iterator[None]:
    """The tokenizers and text encoders without their recorded embeddings for the ``with`` block, as they were after."""
    with contextlib.ExitStack() as stack:
        for tokenizer, encoder in embedding_pairs(pipe).values():
            stack.enter_context(without_tokens(list(sources_of(encoder, tokenizer)), tokenizer, encoder))
        yield


def apply_embeddings(pipe: Pipeline, entry: Any, path_or_repo: str | os.PathLike[str], *, revision: str | None = None) -> None:
    """Add the embeddings a saved preset records (``entry``, its ``_diffblocks_textual_inversions``), in their order.

    Every file is found, checked and read before any token is added; an embedding refused when it is
    added (its token taken) removes those added before it.

    Raises:
        ValueError: the entry is malformed, or a file's sha256 differs from the recorded one (named).
        RepositoryPathError: a file leads out of its repository, or ``repo`` is not a Hub id.
    """
    repository = str(path_or_repo)
    try:
        references = [EmbeddingReference.model_validate(item) for item in entry]
    except (TypeError, ValidationError) as err:
        raise ValueError(_MSG_BAD_ENTRY.format(repository=repository, key=EMBEDDINGS_KEY, err=err)) from None
    read: list[tuple[Embedding, LoRASource]] = []
    for reference in references:
        path, source = resolve_pinned(
            path_or_repo, reference.file, reference.sha256, reference.repo, reference.revision,
            revision=revision, key=EMBEDDINGS_KEY, name=reference.token, kind="textual inversion",
        )
        read.append((Embedding.from_file(path, token=reference.token), source))
    added: list[str] = []
    try:
        for embedding, source in read:
            pipe.add_textual_inversion(embedding, source=source)
            added.append(embedding.token)
    except Exception:
        # an entry refused half-way (two under one token): the tokenizers and encoders, which other
        # pipelines of the manager may share, get back the state they had
        if added:
            pipe.unload_textual_inversion(added)
        raise


__all__ = [
    "EMBEDDINGS_KEY",
    "EMBEDDING_FOLDER",
    "EmbeddingReference",
    "apply_embeddings",
    "detached_embeddings",
    "embedding_pairs",
    "embedding_references",
]
