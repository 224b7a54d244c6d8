"""Activations under a budget: what a VAE decode needs, and slicing or tiling when it would not fit.

The budget a manager plans by counts weights; ``activations=`` reserves part of it for the
tensors a call makes (a Flux step at 1024² makes about 1 GiB of them, the VAE decode after it
about 2). What weights leave of the budget is the **room** for activations, known per model once
its policy is attached (:func:`activation_room`). A decode that would not fit there runs one image
at a time (slicing) or, if one image alone would not fit, in overlapping tiles
(:class:`~diffblocks.components.models.autoencoder_kl.VaeTiling`, the tile layout and cross-fade
of diffusers' ``enable_tiling``), chosen per call by :func:`decode_memory`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, final
from weakref import WeakKeyDictionary

from torch import nn


class _Stages(Protocol):
    @property
    def block_out_channels(self) -> tuple[int, ...]: ...

    @property
    def tile_sample_size(self) -> int: ...

    @property
    def downscale(self) -> int: ...


class Autoencoder(Protocol):
    """What the estimate reads of a VAE (our ``AutoencoderKL``): its stages' widths (memory does not import the models)."""

    @property
    def params(self) -> _Stages: ...

LIVE_TENSORS = 5
"""Tensors of the widest shape a decoder stage holds at once (its input, the group norm's and the
activation's outputs, the convolution's output, the residual sum): the estimate's multiplier."""

MIN_TILE_LATENTS = 4
"""The smallest tile side, in latents, a decode is cut into when even smaller tiles are needed to fit."""

class Lend(Protocol):
    """Frees up to ``nbytes`` on the device for ``asking``'s activations by lending other models' kept blocks; returns the bytes freed."""

    def __call__(self, nbytes: int, *, asking: object) -> int: ...


_ROOM: WeakKeyDictionary[object, tuple[int, Lend | None]] = WeakKeyDictionary()


def activation_room(model: object) -> int | None:
    """Bytes a model's activations may take on the device under its manager's budget (None: no budget)."""
    entry = _ROOM.get(model)
    return entry[0] if entry is not None else None


def set_activation_room(model: nn.Module, room: int | None, lend: Lend | None = None) -> None:
    """Set the room ``model``'s activations have, and who can lend it more (see :mod:`~diffblocks.components.memory.kept`)."""
    if room is None:
        _ROOM.pop(model, None)
    else:
        _ROOM[model] = (room, lend)


def claim_room(model: object, nbytes: int) -> int | None:
    """The room ``model`` has once it has asked for ``nbytes``: more than its planned room if kept blocks were lent to it."""
    entry = _ROOM.get(model)
    if entry is None:
        return None
    room, lend = entry
    if nbytes > room and lend is not None:
        room += lend(nbytes - room, asking=model)
    return room


def decode_bytes(vae: Autoencoder, latents: Sequence[int], itemsize: int) -> int:
    """An estimate of the activation bytes of decoding latents of shape ``latents`` at once.

    The decoder's stages run at rising resolution; the widest tensor is a stage's output channels
    at the resolution its upsampler makes. :data:`LIVE_TENSORS` such tensors are counted live.

    Example:
        >>> from diffblocks.components.models.autoencoder_kl import AutoencoderKL
        >>> import torch
        >>> with torch.device("meta"):
        ...     sdxl = AutoencoderKL.from_config({"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
        ...                                       "down_block_types": ["DownEncoderBlock2D"] * 4,
        ...                                       "up_block_types": ["UpDecoderBlock2D"] * 4})
        >>> decode_bytes(sdxl, (1, 4, 128, 128), itemsize=2) / 2**30   # 256 channels at 1024², 5 live, fp16
        2.5
    """
    batch, _, height, width = latents
    channels = list(reversed(vae.params.block_out_channels))
    widest = 0
    for i, width_channels in enumerate(channels):
        scale = 2 ** (i + 1) if i < len(channels) - 1 else 2**i  # every stage but the last ends upsampled
        widest = max(widest, width_channels * height * scale * width * scale)
    return LIVE_TENSORS * widest * batch * itemsize


@final
@dataclass(frozen=True)
class DecodeMemory:
    """How a decode runs in the room it has: ``slicing`` one image at a time, ``tiling`` in tiles of ``tile`` pixels a side."""

    needs: int
    room: int | None
    slicing: bool = False
    tiling: bool = False
    tile: int | None = None


def decode_memory(vae: Autoencoder, latents: Sequence[int], itemsize: int) -> DecodeMemory:
    """Whether decoding ``latents`` fits the VAE's activation room at once, one image at a time, or only in tiles.

    The room is what the plan left, plus blocks other models keep on the device, lent for this
    decode when the plan's room is too small (:func:`claim_room`). If it is still too small, the
    tiles are the VAE's own tile size (its ``sample_size``, as diffusers' ``enable_tiling``) if a
    tile of that size fits the room, else the largest halving of it that does (no smaller than
    :data:`MIN_TILE_LATENTS` latents: the smallest, if none fits). With no budget (no room known)
    the decode runs as the VAE is set.
    """
    needs = decode_bytes(vae, latents, itemsize)
    room = claim_room(vae, needs)
    if room is None or needs <= room:
        return DecodeMemory(needs, room)
    batch = latents[0]
    if batch > 1 and needs // batch <= room:
        return DecodeMemory(needs, room, slicing=True)
    down, tile = vae.params.downscale, vae.params.tile_sample_size
    while tile // (2 * down) >= MIN_TILE_LATENTS and decode_bytes(vae, (1, latents[1], tile // down, tile // down), itemsize) > room:
        tile //= 2
    return DecodeMemory(needs, room, slicing=batch > 1, tiling=True, tile=tile)
