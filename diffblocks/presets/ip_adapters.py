"""IP-Adapters saved with a preset: their weights in the file layout, the image encoder beside, loaded back as they were.

A pipeline with an IP-Adapter is saved as the pipeline without it (its blocks, its components),
and the adapter beside it, recorded in the modular index under ``_diffblocks_ip_adapter``::

    {"files": ["ip_adapter/ip_adapter_0.safetensors"], "sha256": ["9f2c..."],
     "scales": [[1.0, 1.0, 0.5, ...]], "image_encoder": "image_encoder"}

Each adapter's weights are written in the layout of the original ``ip-adapter_*.safetensors`` files
(``image_proj.*``, ``ip_adapter.N.to_k_ip.weight``, ...; a Flux IP-Adapter's in XLabs' layout,
``ip_adapter_proj_model.*``, ``double_blocks.N.processor.*``), so an adapter given by value saves as
well as one read from a file, and the files load in diffusers' ``load_ip_adapter`` too; the CLIP
image encoder is written with ``save_pretrained`` into ``image_encoder/``, where diffusers' IP-Adapter
repositories keep it. ``from_pretrained`` checks each file's sha256, calls ``load_ip_adapter`` with
the adapters and the encoder, and sets every layer's scale as saved: the same pipeline and image.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import save_file
from transformers import CLIPVisionModelWithProjection

from diffblocks.blocks import Pipeline
from diffblocks.components.containment import contained_path
from diffblocks.components.hub import resolve_folder
from diffblocks.components.lora.sources import file_sha256
from diffblocks.components.models.ip_adapter import (
    FluxIPAdapterModel,
    IPAdapterModel,
    MultiFluxIPAdapterModel,
    MultiIPAdapterModel,
    flux_ip_adapters,
    ip_adapters,
    load_any_ip_adapter_file,
)
from diffblocks.presets.loras import resolve_pinned

IP_ADAPTER_KEY = "_diffblocks_ip_adapter"
IP_ADAPTER_FOLDER = "ip_adapter"
IMAGE_ENCODER_FOLDER = "image_encoder"

_MSG_BAD_ENTRY = "{repository}: the modular index's {key} is not an IP-Adapter record ({err}); nothing was loaded."


class IPAdapterEntry(BaseModel):
    """The IP-Adapters of a saved preset: one file, hash and scale list per adapter, in order, and the image encoder.

    Args:
        files: each adapter's weights, a path inside the preset's folder.
        sha256: each file's hash, checked before it is read.
        scales: each adapter's scale per cross-attention layer (``set_ip_adapter_scale``, expanded).
        image_encoder: the image encoder's folder inside the preset's, or None when none was loaded.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    files: list[str] = Field(min_length=1)
    sha256: list[str] = Field(min_length=1)
    scales: list[list[float]] = Field(min_length=1)
    image_encoder: str | None = IMAGE_ENCODER_FOLDER

    def model_post_init(self, context: Any) -> None:
        if not len(self.files) == len(self.sha256) == len(self.scales):
            raise ValueError(f"{len(self.files)} files, {len(self.sha256)} hashes and {len(self.scales)} scale lists: one of each per adapter")
        if any(len(h) != 64 or any(c not in "0123456789abcdef" for c in h) for h in self.sha256):
            raise ValueError("a sha256 is not 64 hex digits")


@dataclass(frozen=True)
class HeldIPAdapter:
    """A pipeline's IP-Adapters and image encoder, taken out for a save."""

    adapters: tuple[IPAdapterModel | FluxIPAdapterModel, ...]
    encoder: CLIPVisionModelWithProjection | None


@contextlib.contextmanager
def ip_adapter_detached(pipe: Pipeline) -> Iterator[HeldIPAdapter | None]:
    """The pipeline without its IP-Adapter for the ``with`` block (yielding what was taken out), with it again after.

    The very adapter and encoder objects come back, with their scales; None: the pipeline has no IP-Adapter.
    """
    keys = pipe.component_keys()  # by key: pipe.components would load every lazy component
    component = pipe.manager.get(keys["ip_adapter"]) if "ip_adapter" in keys else None
    if isinstance(component, (FluxIPAdapterModel, MultiFluxIPAdapterModel)):
        adapters: tuple[IPAdapterModel | FluxIPAdapterModel, ...] = flux_ip_adapters(component)
    elif isinstance(component, (IPAdapterModel, MultiIPAdapterModel)):
        adapters = ip_adapters(component)
    else:
        yield None
        return
    encoder = pipe.manager.get(keys["image_encoder"]) if "image_encoder" in keys else None
    held = HeldIPAdapter(adapters, encoder if isinstance(encoder, CLIPVisionModelWithProjection) else None)
    scales = [adapter.scales for adapter in held.adapters]
    pipe.unload_ip_adapter()
    try:
        yield held
    finally:
        pipe.load_ip_adapter(list(held.adapters), image_encoder=held.encoder)
        for adapter, kept in zip(held.adapters, scales, strict=True):
            adapter.set_scales(kept)


def write_ip_adapter(staging: Path, held: HeldIPAdapter) -> IPAdapterEntry:
    """Write the adapters' weights (file layout) and the image encoder into the folder being saved; their record."""
    folder = staging / IP_ADAPTER_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    for i, adapter in enumerate(held.adapters):
        file = f"{IP_ADAPTER_FOLDER}/ip_adapter_{i}.safetensors"
        tensors = adapter.xlabs_state_dict() if isinstance(adapter, FluxIPAdapterModel) else adapter.state_dict()
        save_file({key: tensor.detach().contiguous().cpu() for key, tensor in tensors.items()}, staging / file)
        files.append(file)
    if held.encoder is not None:
        held.encoder.save_pretrained(staging / IMAGE_ENCODER_FOLDER)
    return IPAdapterEntry(
        files=files,
        sha256=[file_sha256(staging / file) for file in files],
        scales=[list(adapter.scales) for adapter in held.adapters],
        image_encoder=IMAGE_ENCODER_FOLDER if held.encoder is not None else None,
    )


def apply_ip_adapter(pipe: Pipeline, entry: Any, path_or_repo: str | os.PathLike[str], *, revision: str | None = None) -> None:
    """Load the IP-Adapters a saved preset records (``entry``, its ``_diffblocks_ip_adapter``), scales and encoder as saved.

    Every file is found, checked and read before the pipeline changes.

    Raises:
        ValueError: the entry is malformed, a file's sha256 differs from the recorded one (named), or
            the scales do not fit the adapters.
        RepositoryPathError: a file or the encoder's folder leads out of the repository.
    """
    repository = str(path_or_repo)
    try:
        record = IPAdapterEntry.model_validate(entry)
    except (TypeError, ValidationError) as err:
        raise ValueError(_MSG_BAD_ENTRY.format(repository=repository, key=IP_ADAPTER_KEY, err=err)) from None
    adapters = []
    for i, (file, sha256) in enumerate(zip(record.files, record.sha256, strict=True)):
        path, _ = resolve_pinned(path_or_repo, file, sha256, None, None, revision=revision, key=IP_ADAPTER_KEY, name=f"adapter {i}", kind="IP-Adapter")
        adapters.append(load_any_ip_adapter_file(path))
    for adapter, scales in zip(adapters, record.scales, strict=True):
        adapter.set_scales(scales)
    encoder = None
    if record.image_encoder is not None:
        pattern = f"{record.image_encoder}/*"
        root = resolve_folder(path_or_repo, revision=revision, allow_patterns=[pattern])
        folder = contained_path(root, record.image_encoder, repository=repository, entry=f"{IP_ADAPTER_KEY}'s image_encoder")
        encoder = CLIPVisionModelWithProjection.from_pretrained(folder)
    pipe.load_ip_adapter(adapters, image_encoder=encoder)


__all__ = [
    "IMAGE_ENCODER_FOLDER",
    "IP_ADAPTER_FOLDER",
    "IP_ADAPTER_KEY",
    "HeldIPAdapter",
    "IPAdapterEntry",
    "apply_ip_adapter",
    "ip_adapter_detached",
    "write_ip_adapter",
]
