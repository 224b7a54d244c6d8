"""Tiny SD 1.5 and SDXL pipeline folders with IP-Adapter files and an image encoder beside them, made once per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.ip_adapter.ip_files import ip_adapter_repo
from tests.presets.sd_fixtures import tiny_sd15, tiny_sdxl

FILES: dict[str, Any] = {"plain.safetensors": "plain", "plus.safetensors": "plus", "full.safetensors": "full"}


@pytest.fixture(scope="session")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ip_sd15")
    base = tiny_sd15(root / "sd15")
    return base, ip_adapter_repo(root / "ip", base / "unet", FILES)


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ip_sdxl")
    base = tiny_sdxl(root / "sdxl")
    return base, ip_adapter_repo(root / "ip", base / "unet", FILES, subfolder="sdxl_models")
