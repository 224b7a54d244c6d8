"""The activations of one denoiser step, estimated from the requested size before anything runs.

A step's activations are set by its widest attention layer: the sequence there (image tokens at
that resolution, plus the text tokens where attention is joint, as in Flux), the channels, and
the batch the guider runs at once (images x batched guidance passes). What attention itself
holds depends on the backend:

- a backend that materialises the scores (``reference``, ``sdpa_math``) holds ``batch x heads x
  L x L`` of them, twice (the scores and their softmax);
- a tiled one (flash attention, the memory-efficient and cuDNN SDPA kernels, sage, xformers,
  flex, and ``sdpa`` / ``auto`` on CUDA, which pick one of those) holds one row statistic per
  query (Dao et al., *FlashAttention*, 2022), a few bytes per token and head.

Around it, :data:`LIVE_STREAMS` tensors of ``batch x L x channels`` (the residual stream, the
normalised and modulated input, query, key, value, their rotated copies, the attention output
and its projection) and three of the MLP's width (``mlp_ratio`` times wider: its hidden layer, its
activation's output, and the concatenation a parallel block projects) are live at once. The estimate is on the
high side; :func:`step_bytes` is what the planner's ``activations=`` would reserve for a call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, final

from diffblocks.components.memory.sizes import ByteSize

MATERIALISED = frozenset({"reference", "sdpa_math"})
"""Attention backends that hold the full score matrix."""

LIVE_STREAMS = 10
"""Tensors of ``batch x tokens x channels`` live at the widest attention layer (see the module docstring)."""

_VAE_FACTOR = 8  # latent pixels per image pixel, per side, in every family we ship


@final
@dataclass(frozen=True)
class StepShape:
    """The widest attention layer of a denoiser at one requested size.

    Attributes:
        tokens: the sequence attention runs over there (image tokens, plus text tokens if joint).
        channels: the width of the stream there.
        heads: attention heads there.
        mlp_ratio: the MLP's hidden width over ``channels``.
        held: elements per sample held through the whole step besides (a UNet's skip connections).
    """

    tokens: int
    channels: int
    heads: int
    mlp_ratio: float = 4.0
    held: int = 0


def step_bytes(shape: StepShape, *, batch: int, backend: str = "sdpa", itemsize: int = 2) -> ByteSize:
    """Bytes of activations one forward of a denoiser makes at ``shape``, ``batch`` samples at once.

    Args:
        shape: the widest attention layer (:func:`unet_shape`, :func:`flux_shape`).
        batch: samples per forward: images times the guidance passes run batched (2 for classifier-free
            guidance batched, 1 for Flux.1-dev's distilled guidance or passes run one by one).
        backend: the attention backend's name (``diffblocks.components.attention``).
        itemsize: bytes per activation element (2 for float16 and bfloat16).

    Raises:
        ValueError: a batch or shape that is not positive.

    Example:
        >>> flux = flux_shape({}, height=1024, width=1024)   # Flux.1: 4096 image + 512 text tokens, 3072 wide
        >>> str(step_bytes(flux, batch=1))
        '594.4 MiB'
        >>> str(step_bytes(flux, batch=1, backend="reference"))   # the scores: 24 heads x 4608², twice
        '2.5 GiB'
    """
    if batch < 1 or shape.tokens < 1 or shape.channels < 1 or shape.heads < 1:
        raise ValueError(f"step_bytes: batch {batch} and {shape} must be positive")
    stream = batch * shape.tokens * shape.channels
    mlp = 3 * int(stream * shape.mlp_ratio)  # the hidden layer, its activation's output, a parallel block's concatenation
    if backend in MATERIALISED:
        attention = 2 * batch * shape.heads * shape.tokens * shape.tokens
    else:
        attention = batch * shape.heads * shape.tokens * 2  # a float32 row statistic per query and head, in items
    return ByteSize((LIVE_STREAMS * stream + mlp + attention + batch * shape.held) * itemsize)


def flux_shape(config: Mapping[str, Any], *, height: int, width: int, text_tokens: int = 512) -> StepShape:
    """A Flux transformer's widest attention (every block: joint over image and text tokens) at ``height`` x ``width`` pixels.

    Flux packs 2x2 latent patches into one token, so a 1024² image is 64 x 64 = 4096 tokens.
    ``config`` holds what differs from Flux.1's defaults (diffusers' keys).
    """
    _check_size(height, width, multiple=2 * _VAE_FACTOR)
    image = (height // (2 * _VAE_FACTOR)) * (width // (2 * _VAE_FACTOR))
    return flux_tokens_shape(config, image_tokens=image, text_tokens=text_tokens)


def flux_tokens_shape(config: Mapping[str, Any], *, image_tokens: int, text_tokens: int) -> StepShape:
    """A Flux transformer's widest attention over ``image_tokens`` packed latent tokens and ``text_tokens`` (a call's own counts)."""
    heads = int(config.get("num_attention_heads", 24))
    channels = heads * int(config.get("attention_head_dim", 128))
    return StepShape(tokens=image_tokens + text_tokens, channels=channels, heads=heads)


def unet_shape(config: Mapping[str, Any], *, height: int, width: int) -> StepShape:
    """A UNet's widest attention: the self-attention of its first cross-attention down block, at that block's resolution.

    Each down block but the last halves the resolution; SD 1.5's first block attends over 64 x 64
    = 4096 tokens of 320 channels at 512², SDXL's second (its first has no attention) over 4096 of
    640 at 1024². ``attention_head_dim`` is the number of heads, diffusers' naming.
    """
    _check_size(height, width, multiple=_VAE_FACTOR)
    kinds = list(config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    channels = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    heads = config.get("attention_head_dim", 8)
    level = next((i for i, kind in enumerate(kinds) if "CrossAttn" in kind), None)
    if level is None:  # no attention: the widest tensor is the first block's stream
        level, count = 0, 1
    else:
        count = heads[level] if isinstance(heads, (list, tuple)) else int(heads)
    side = 2**level * _VAE_FACTOR
    layers = config.get("layers_per_block", 2)
    held = 0  # the skip connections: conv_in's output, each resnet's, each downsampler's, kept for the up blocks
    for i, width_i in enumerate(channels):
        per = layers[i] if isinstance(layers, (list, tuple)) else int(layers)
        tokens_i = (height // (2**i * _VAE_FACTOR)) * (width // (2**i * _VAE_FACTOR))
        held += (per + (1 if i < len(channels) - 1 else 0) + (1 if i == 0 else 0)) * tokens_i * int(width_i)
    return StepShape(tokens=(height // side) * (width // side), channels=int(channels[level]), heads=int(count), held=held)


def _check_size(height: int, width: int, *, multiple: int) -> None:
    if height < multiple or width < multiple or height % multiple or width % multiple:
        raise ValueError(f"image size {height}x{width} must be positive multiples of {multiple} pixels for this denoiser")
