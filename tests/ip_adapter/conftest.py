"""Tiny SD 1.5, SDXL and Flux pipeline folders with IP-Adapter files and an image encoder beside them, made once per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.ip_adapter.ip_files import ip_adapter_repo, xlabs_repo
from tests.presets.flux_fixtures import tiny_flux
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


@pytest.fixture(scope="session")
def flux(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Flux.1-dev folder (2 double blocks, T5 width 32, width 32) and an XLabs-layout folder of two adapters for it."""
    root = tmp_path_factory.mktemp("ip_flux")
    return tiny_flux(root / "flux", double_blocks=2), xlabs_repo(root / "ip", 2, 32, 32, seeds=(3, 4))
