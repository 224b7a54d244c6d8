"""Training data: world images and the tokenised captions, made in parallel, then encoded on the device."""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from transformers import AutoTokenizer, BertModel, PreTrainedTokenizerBase

from diffblocks.presets.tiny.text_encoder import TEXT_MAX_LENGTH
from diffblocks.presets.tiny.world import make_batch

SHARD = 4096


@dataclass(frozen=True)
class Dataset:
    """``images`` uint8 (n, 64, 64, 3) and the captions' token ids and attention masks (n, 32)."""

    images: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray


def _shard(job: tuple[int, int, int, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, seed, start, tokenizer_dir = job
    images, captions = make_batch(n, seed, start=start)
    tokenize = _tokenizer(tokenizer_dir)
    tokens = tokenize(captions, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True, return_tensors="np")
    return images, tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(bool)


_TOKENIZERS: dict[str, PreTrainedTokenizerBase] = {}


def _tokenizer(folder: str) -> PreTrainedTokenizerBase:
    """One tokenizer per folder and process (each renderer process loads its own)."""
    if folder not in _TOKENIZERS:
        _TOKENIZERS[folder] = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return _TOKENIZERS[folder]


def make_dataset(n: int, *, seed: int, text_encoder_dir: Path, workers: int) -> Dataset:
    """``n`` captioned images of the world (sample ``i`` is ``make_batch``'s sample ``i`` for ``seed``).

    Args:
        n: number of samples.
        seed: dataset seed.
        text_encoder_dir: folder with the MiniLM tokenizer files.
        workers: processes; shards are independent, so the result does not depend on this.
    """
    jobs = [(min(SHARD, n - start), seed, start, str(text_encoder_dir)) for start in range(0, n, SHARD)]
    if workers > 1:
        # Each worker loads its own tokenizer; the Rust thread pool is not fork-safe across processes.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_shard, jobs, chunksize=1)
    else:
        parts = [_shard(job) for job in jobs]
    return Dataset(
        images=np.concatenate([p[0] for p in parts]),
        input_ids=np.concatenate([p[1] for p in parts]),
        attention_mask=np.concatenate([p[2] for p in parts]),
    )


@torch.no_grad()
def encode_tokens(
    encoder: BertModel,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    *,
    device: torch.device,
    batch_size: int = 4096,
) -> Tensor:
    """MiniLM last hidden states (n, 32, 384) in float16 on ``device``, as ``encode_prompts`` computes them."""
    shape = (len(input_ids), input_ids.shape[1], encoder.config.hidden_size)
    out = torch.empty(shape, dtype=torch.float16, device=device)
    for start in range(0, len(input_ids), batch_size):
        ids = torch.from_numpy(input_ids[start : start + batch_size]).to(device, torch.long)
        mask = torch.from_numpy(attention_mask[start : start + batch_size]).to(device, torch.long)
        out[start : start + len(ids)] = encoder(input_ids=ids, attention_mask=mask).last_hidden_state.to(torch.float16)
    return out
