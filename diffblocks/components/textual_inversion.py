"""Textual inversion: new tokens whose input embeddings were learned (Gal et al., 2022, "An Image is Worth One Word").

An :class:`Embedding` is a token and, per text encoder, its vectors: one row of the encoder's
input embedding matrix each. :func:`add_tokens` gives the tokenizer the token (``token``,
``token_1``, ``token_2``, ... for a multi-vector embedding, as diffusers names them) and appends
the vectors to the embedding matrix at the new ids; :func:`remove_tokens` takes them out again,
so the tokenizer and the matrix are as they were, bit for bit. A prompt names a multi-vector
embedding by its token alone; :func:`expand_prompt` writes out the rest, as diffusers'
``maybe_convert_prompt`` does.

The file layouts, one table:

| layout | who writes it | holds | token |
|---|---|---|---|
| ``{token: vectors}`` (``learned_embeds.safetensors`` / ``.bin``) | diffusers' textual inversion training | ``text_encoder`` | the key |
| ``{"emb_params": vectors}`` (``.safetensors``) | A1111 | ``text_encoder`` | the file's stem |
| ``{"string_to_param": {"*": vectors}, "name": ...}`` (``.pt``) | A1111 | ``text_encoder`` | ``name`` |
| ``{"clip_l": vectors, "clip_g": vectors}`` (``.safetensors``) | SDXL trainers (A1111, kohya) | ``text_encoder``, ``text_encoder_2`` | the file's stem |

A ``token`` argument replaces the file's. Pickles (``.pt``, ``.bin``) are read only with
``allow_pickle=True``, and then with ``torch.load(weights_only=True)``.

:func:`without_tokens` takes tokens out for the length of a ``with`` block, so that a saved
preset writes the tokenizer and the encoder as themselves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, final

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

_MSG_PICKLE = (
    "{path} is a pickle; loading one can run code hidden in it. Prefer a .safetensors file, or pass "
    "allow_pickle=True if you trust its source (it is then read with torch.load(weights_only=True))"
)
_MSG_LAYOUT = (
    "{path} is not a textual inversion embedding diffblocks reads: its keys are {keys}. Expected "
    "{{token: vectors}} (diffusers), 'emb_params' or 'string_to_param' (A1111), or 'clip_l' and 'clip_g' (SDXL)"
)


@final
@dataclass(frozen=True, slots=True)
class Embedding:
    """A textual inversion token and its vectors, ``(count, width)``, for each text encoder it was trained for.

    Args:
        token: the word prompts use; a multi-vector embedding adds ``token_1``, ``token_2``, ... after it.
        vectors: text encoder component name (``text_encoder``, ``text_encoder_2``) -> its vectors.

    Example:
        >>> embedding = Embedding("<cat>", {"text_encoder": torch.zeros(3, 8)})
        >>> embedding.tokens("text_encoder")
        ['<cat>', '<cat>_1', '<cat>_2']
    """

    token: str
    vectors: Mapping[str, Tensor] = field(repr=False)

    def __post_init__(self) -> None:
        if not self.token or any(ch.isspace() for ch in self.token):
            raise ValueError(f"a textual inversion token must be one word, not {self.token!r}")
        for name, vectors in self.vectors.items():
            if vectors.ndim != 2 or vectors.shape[0] == 0 or not vectors.dtype.is_floating_point:
                raise ValueError(f"textual inversion {self.token!r}: the {name} vectors must be (count, width), not {tuple(vectors.shape)}")
            if not torch.isfinite(vectors).all():
                raise ValueError(f"textual inversion {self.token!r}: the {name} vectors hold NaN or infinite values")

    def tokens(self, component: str) -> list[str]:
        """The tokens added for ``component``: the token, then ``token_1``, ``token_2``, ... for each further vector."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.vectors[component].shape[0])]

    @classmethod
    def from_file(cls, path: str | Path, *, token: str | None = None, allow_pickle: bool = False) -> Embedding:
        """Read an embedding file in any layout of the table above; ``token`` replaces the file's."""
        path = Path(path)
        if path.suffix == ".safetensors":
            content: Any = load_file(path)
        elif not allow_pickle:
            raise ValueError(_MSG_PICKLE.format(path=path))
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
        return cls.from_state_dict(content, token=token, stem=path.stem, source=str(path))

    @classmethod
    def from_state_dict(cls, content: Any, *, token: str | None = None, stem: str = "", source: str = "the embedding") -> Embedding:
        """Read a loaded file's content (see :meth:`from_file`); ``stem`` names the token of layouts that hold none."""
        if isinstance(content, Tensor):
            found, vectors = None, {"text_encoder": content}
        elif not isinstance(content, dict):
            raise ValueError(f"{source} holds a {type(content).__name__}, not a textual inversion embedding")
        elif isinstance(content.get("string_to_param"), dict) and isinstance(content["string_to_param"].get("*"), Tensor):
            found, vectors = content.get("name"), {"text_encoder": content["string_to_param"]["*"]}
        elif "emb_params" in content:
            found, vectors = stem, {"text_encoder": content["emb_params"]}
        elif "clip_l" in content and "clip_g" in content:
            found, vectors = stem, {"text_encoder": content["clip_l"], "text_encoder_2": content["clip_g"]}
        elif len(content) == 1 and isinstance(next(iter(content.values())), Tensor):
            found, vectors = next(iter(content.items()))
            vectors = {"text_encoder": vectors}
        else:
            raise ValueError(_MSG_LAYOUT.format(path=source, keys=sorted(map(str, content))))
        name = token or found
        if not isinstance(name, str) or not name:
            raise ValueError(f"{source} names no token; give one with token=...")
        return cls(name, {key: value.detach().float().reshape(-1, value.shape[-1]) for key, value in vectors.items()})


def check_addable(embedding: Embedding, component: str, tokenizer: Any, encoder: nn.Module) -> None:
    """Raise the error :func:`add_tokens` would, changing nothing: so several encoders can be checked first."""
    _backend(tokenizer)
    vocab = tokenizer.get_vocab()
    taken = [token for token in embedding.tokens(component) if token in vocab]
    if taken:
        raise ValueError(
            f"textual inversion token {taken[0]!r} is already in the vocabulary of {component}'s tokenizer; "
            f"unload it first, or give another with token=..."
        )
    table = _table(encoder)
    width = embedding.vectors[component].shape[1]
    if width != table.embedding_dim:
        raise ValueError(
            f"textual inversion {embedding.token!r} has vectors of width {width}, but {component} "
            f"({type(encoder).__name__}) embeds tokens in {table.embedding_dim}: it was trained for another model"
        )
    if table.num_embeddings != len(tokenizer):
        raise ValueError(
            f"{component} has {table.num_embeddings} token embeddings but its tokenizer {len(tokenizer)} tokens; "
            "new tokens would not get their own rows"
        )


@torch.no_grad()
def add_tokens(embedding: Embedding, component: str, tokenizer: Any, encoder: nn.Module) -> list[str]:
    """Add the embedding's tokens to ``tokenizer`` and its vectors to ``encoder``'s embedding matrix; returns the tokens.

    The matrix keeps its module; its weight becomes the old rows followed by the new ones, at the
    ids the tokenizer gives the tokens.

    Raises:
        ValueError: a token already in the vocabulary (named), vectors of another width (both
            named), or a tokenizer without the ``tokenizers`` backend; nothing changes.
    """
    check_addable(embedding, component, tokenizer, encoder)
    tokens, table = embedding.tokens(component), _table(encoder)
    first = len(tokenizer)
    tokenizer.add_tokens(tokens)
    assert tokenizer.convert_tokens_to_ids(tokens) == list(range(first, first + len(tokens)))
    vectors = embedding.vectors[component].to(table.weight.device, table.weight.dtype)
    _set_rows(encoder, torch.cat([table.weight.detach(), vectors]))
    return tokens


@torch.no_grad()
def remove_tokens(tokens: list[str], tokenizer: Any, encoder: nn.Module) -> None:
    """Remove added ``tokens`` from ``tokenizer`` and their rows from ``encoder``; later added tokens move down.

    Raises:
        KeyError: a token that is not an added token of this tokenizer; nothing changes.
    """
    backend = _backend(tokenizer)
    base, added = tokenizer.vocab_size, added_tokens(tokenizer)
    missing = [token for token in tokens if token not in added]
    if missing:
        raise KeyError(f"no textual inversion token {missing[0]!r} was added to this tokenizer; added: {list(added)}")
    table, removed = _table(encoder), {added[token] for token in tokens}
    kept = [i for i in range(table.num_embeddings) if i not in removed]
    # The tokenizer's own list of added tokens, without these, renumbered from the base vocabulary up
    data = json.loads(backend.to_str())
    next_id, entries = base, []
    for entry in data.get("added_tokens", []):
        if entry["content"] in tokens:
            continue
        if entry["id"] >= base:
            entry["id"], next_id = next_id, next_id + 1
        entries.append(entry)
    data["added_tokens"] = entries
    tokenizer._tokenizer = type(backend).from_str(json.dumps(data))  # transformers 5 keeps no other copy of them
    _set_rows(encoder, table.weight.detach()[kept])


def added_tokens(tokenizer: Any) -> dict[str, int]:
    """The tokens added to ``tokenizer`` after its base vocabulary (textual inversion's), with their ids."""
    base = tokenizer.vocab_size
    return {token: i for token, i in tokenizer.added_tokens_encoder.items() if i >= base}


def expand_prompt(prompt: str, tokenizer: Any) -> str:
    """Write a multi-vector token out in full: ``<cat>`` becomes ``<cat> <cat>_1 <cat>_2`` (diffusers' ``maybe_convert_prompt``)."""
    added = added_tokens(tokenizer)
    if not added:
        return prompt
    for token in set(tokenizer.tokenize(prompt)):
        if token in added and f"{token}_1" in added:
            replacement, i = token, 1
            while f"{token}_{i}" in added:
                replacement, i = f"{replacement} {token}_{i}", i + 1
            prompt = prompt.replace(token, replacement)
    return prompt


def token_family(token: str, added: Mapping[str, int]) -> list[str]:
    """``token`` and its ``token_1``, ``token_2``, ... among the ``added`` tokens: what one embedding added."""
    return [t for t in added if t == token or (t.startswith(f"{token}_") and t[len(token) + 1 :].isdigit())]


@contextmanager
def without_tokens(tokens: list[str], tokenizer: Any, encoder: nn.Module) -> Iterator[None]:
    """``tokenizer`` and ``encoder`` without the embeddings ``tokens`` (each with its ``_1``, ... tokens) for the ``with`` block.

    Afterwards the very backend, matrix parameter and counts come back, so that ids, vectors and
    ``requires_grad`` are as they were, bit for bit (removing and adding again would renumber).
    """
    added = added_tokens(tokenizer)
    removed = [t for token in tokens for t in token_family(token, added)]
    if not removed:
        yield
        return
    table = _table(encoder)
    config = getattr(encoder, "config", None)
    saved = (tokenizer._tokenizer, table.weight, table.num_embeddings, getattr(config, "vocab_size", None))
    remove_tokens(removed, tokenizer, encoder)
    try:
        yield
    finally:
        tokenizer._tokenizer, table.weight, table.num_embeddings = saved[:3]
        if config is not None and saved[3] is not None:
            config.vocab_size = saved[3]


def _backend(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise ValueError(
            f"textual inversion needs a tokenizer with the `tokenizers` backend (a fast tokenizer); {type(tokenizer).__name__} is not one"
        )
    return backend


def _table(encoder: nn.Module) -> nn.Embedding:
    getter = getattr(encoder, "get_input_embeddings", None)  # transformers models have it
    table = getter() if callable(getter) else None
    if not isinstance(table, nn.Embedding):
        raise ValueError(f"{type(encoder).__name__} has no token embedding matrix to add textual inversion vectors to")
    return table


def _set_rows(encoder: nn.Module, weight: Tensor) -> None:
    """Give the encoder's token embedding ``weight`` (its module and ``requires_grad`` kept) and its config the row count."""
    table = _table(encoder)
    table.weight = nn.Parameter(weight, requires_grad=table.weight.requires_grad)
    table.num_embeddings = weight.shape[0]
    config = getattr(encoder, "config", None)
    if config is not None and hasattr(config, "vocab_size"):
        config.vocab_size = weight.shape[0]


__all__ = [
    "Embedding",
    "add_tokens",
    "added_tokens",
    "check_addable",
    "expand_prompt",
    "remove_tokens",
    "token_family",
    "without_tokens",
]
