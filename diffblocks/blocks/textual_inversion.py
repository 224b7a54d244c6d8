"""The diffusers-style textual inversion methods of a pipeline, on top of :mod:`diffblocks.components.textual_inversion`.

``load_textual_inversion`` reads an embedding file and adds its token to each text encoder it
has vectors for (SD 1.x's one; SDXL's two for a ``clip_l``/``clip_g`` file) and to that encoder's
tokenizer, recording the file (a Hub file at the commit read) so that a saved preset names it;
``add_textual_inversion`` adds an :class:`Embedding` value; ``unload_textual_inversion`` removes
tokens again. The prompt encoders write a multi-vector token out in full (``<cat>`` becomes
``<cat> <cat>_1 ...``), as diffusers does.
"""

from __future__ import annotations

import os
import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from torch import nn

from diffblocks.components.compiled import unwrap_compiled
from diffblocks.components.lora.sources import LoRASource, resolve_lora_file
from diffblocks.components.textual_inversion import (
    Embedding,
    add_tokens,
    added_tokens,
    check_addable,
    remove_tokens,
    token_family,
)

DEFAULT_EMBEDDING_NAME = "learned_embeds.safetensors"
ENCODER_TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
"""Each text encoder component a textual inversion may extend, with its tokenizer's component name."""


class AbstractTextualInversionMethods(ABC):
    """``load_textual_inversion`` and ``unload_textual_inversion``."""

    @property
    @abstractmethod
    def components(self) -> dict[str, Any]: ...

    def load_textual_inversion(
        self,
        path_or_repo: str | os.PathLike[str],
        token: str | None = None,
        *,
        weight_name: str | None = None,
        allow_pickle: bool = False,
        revision: str | None = None,
    ) -> list[str]:
        """Add a textual inversion embedding's token to the tokenizers and its vectors to the text encoders.

        Args:
            path_or_repo: an embedding file, a folder, or a Hub repository id.
            token: the token prompts use; default the file's (see :mod:`diffblocks.components.textual_inversion`).
            weight_name: the file inside the folder or repository; default ``learned_embeds.safetensors``.
            allow_pickle: accept a pickled ``.pt``/``.bin``; only for files from a source you trust.
            revision: a Hub branch, tag or commit; a saved preset records the commit read.

        Returns:
            The tokens added (``token``, then ``token_1``, ... for a multi-vector embedding).

        Raises:
            ValueError: a token already in a vocabulary (named), vectors of another width (both
                named), vectors for a text encoder the pipeline lacks, a pickle without
                ``allow_pickle``, a file of no known layout; nothing changes.
        """
        path, source = resolve_lora_file(
            path_or_repo, weight_name, revision=revision, default=DEFAULT_EMBEDDING_NAME, kind="textual inversion file"
        )
        return self.add_textual_inversion(Embedding.from_file(path, token=token, allow_pickle=allow_pickle), source=source)

    def add_textual_inversion(self, embedding: Embedding, *, source: LoRASource | None = None) -> list[str]:
        """Add an embedding value's tokens and vectors, as :meth:`load_textual_inversion` does with a file's.

        ``source`` is the file it was read from (pinned and hashed), which a saved preset records; a
        pipeline holding an embedding without one cannot be saved.

        Raises:
            ValueError: as :meth:`load_textual_inversion`; nothing changes.
        """
        pairs = self._encoder_pairs()
        for component in embedding.vectors:  # every encoder checked before any changes
            if component not in pairs:
                raise ValueError(
                    f"textual inversion {embedding.token!r} has vectors for {component}, which this pipeline has none of "
                    f"(it has {sorted(pairs)}); the embedding is for another family"
                )
            check_addable(embedding, component, *pairs[component])
        tokenizers = [id(pairs[component][0]) for component in embedding.vectors]
        if len(set(tokenizers)) < len(tokenizers):
            raise ValueError(
                f"textual inversion {embedding.token!r} has vectors for {sorted(embedding.vectors)}, whose tokenizers are one "
                "object here; give each text encoder its own tokenizer"
            )
        added: list[str] = []
        for component in embedding.vectors:
            added += [t for t in add_tokens(embedding, component, *pairs[component]) if t not in added]
            record_source(unwrap_compiled(pairs[component][1]), embedding.token, source)  # the module a save finds
        return added

    def unload_textual_inversion(self, tokens: str | Sequence[str] | None = None) -> None:
        """Remove textual inversion tokens (each with its ``_1``, ``_2``, ... vectors), or all of them.

        The tokenizers and the embedding matrices are as they were before the tokens were added,
        bit for bit; tokens added after them move down to the freed ids.

        Raises:
            KeyError: a token that no tokenizer of the pipeline has added; nothing changes.
        """
        pairs = self._encoder_pairs()
        added = {component: added_tokens(tokenizer) for component, (tokenizer, _) in pairs.items()}
        if tokens is None:
            names = sorted({token for found in added.values() for token in found})
        else:
            names = [tokens] if isinstance(tokens, str) else list(tokens)
            every = {token for found in added.values() for token in found}
            missing = [token for token in names if token not in every]
            if missing:
                raise KeyError(f"no textual inversion token {missing[0]!r} is loaded; loaded: {sorted(every)}")
        for component, (tokenizer, encoder) in pairs.items():
            found = [t for n in names for t in token_family(n, added[component])]
            if found:
                remove_tokens(found, tokenizer, encoder)

    def _encoder_pairs(self) -> dict[str, tuple[Any, nn.Module]]:
        """Text encoder component name -> (its tokenizer, the encoder), for the pairs the pipeline has."""
        components = self.components
        pairs: dict[str, tuple[Any, nn.Module]] = {}
        for encoder_name, tokenizer_name in ENCODER_TOKENIZERS.items():
            encoder, tokenizer = components.get(encoder_name), components.get(tokenizer_name)
            if isinstance(encoder, nn.Module) and tokenizer is not None:
                pairs[encoder_name] = (tokenizer, encoder)
        return pairs


def record_source(encoder: nn.Module, token: str, source: LoRASource | None) -> None:
    """Remember the file that ``token``'s vectors in ``encoder`` were read from; None: they were given as tensors."""
    sources = _SOURCES.setdefault(encoder, {})
    sources.pop(token, None)  # a token added again goes to the end, as its ids do
    sources[token] = source


def sources_of(encoder: nn.Module, tokenizer: Any) -> dict[str, LoRASource | None]:
    """The recorded embedding tokens ``encoder`` holds now, in the order they were added, each with its file.

    Tokens added without :func:`record_source` are not listed: they are part of the tokenizer and
    encoder as they were given, and are saved with them.
    """
    added = added_tokens(tokenizer)
    return {token: source for token, source in _SOURCES.get(encoder, {}).items() if token in added}


_SOURCES: weakref.WeakKeyDictionary[nn.Module, dict[str, LoRASource | None]] = weakref.WeakKeyDictionary()


__all__ = ["DEFAULT_EMBEDDING_NAME", "ENCODER_TOKENIZERS", "AbstractTextualInversionMethods", "record_source", "sources_of"]
