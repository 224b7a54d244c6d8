"""Lay out local folders as the Hugging Face cache, so Hub ids resolve offline in tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def use_hub_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> Path:
    """Point huggingface_hub at ``cache`` and force offline mode."""
    import huggingface_hub.constants

    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def add_cached_repo(cache: Path, repo_id: str, source: Path, *, commit: str = "0" * 40, ref: str = "main") -> Path:
    """Copy ``source`` into the cache as ``repo_id`` at ``commit``, with ``refs/<ref>`` pointing at it."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(source, snapshot, dirs_exist_ok=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    return snapshot
