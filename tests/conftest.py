"""Shared test set-up: offline, deterministic, CPU."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest
import torch

# The tests' models are tiny: their ops take microseconds, and a second torch thread waiting for a
# core held by another process makes them 10-100x slower. One thread is as fast on an idle machine.
torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
CLIP_TOKENIZER_DIR = FIXTURES / "tokenizers" / "clip"
T5_TOKENIZER_DIR = FIXTURES / "tokenizers" / "t5"


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
