"""Dequantize GGUF (ggml) weight blocks with torch, one vectorised function per block type.

A quantized row is a run of fixed-size blocks; each block stores ``block_size`` weights in
``type_size`` bytes. The layouts are ggml's (``ggml-common.h``, the ``block_q*`` structs) and the
arithmetic follows its reference ``dequantize_row_q*`` functions in ``ggml-quants.c`` term for
term (``(d * scale) * q - dmin * min``), so results equal ggml's to the last bit in float32.
Scales are little-endian float16; ``QK_K = 256`` for the K-quants, 32 for the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

import torch
from torch import Tensor

QK: Final = 32
QK_K: Final = 256


def _half(blocks: Tensor, start: int) -> Tensor:
    """The float16 at bytes ``[start, start + 2)`` of each block, as float32, shape ``(n, 1)``."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _int(x: Tensor) -> Tensor:
    return x.to(torch.int32, memory_format=torch.contiguous_format)


def _q8_0(blocks: Tensor) -> Tensor:
    # d: f16 | qs: int8[32]
    d = _half(blocks, 0)
    q = blocks[:, 2:].contiguous().view(torch.int8).float()
    return d * q


def _nibbles(qs: Tensor) -> Tensor:
    """Low nibbles give weights 0..15 of a block, high nibbles 16..31."""
    return torch.cat([_int(qs) & 0xF, _int(qs) >> 4], dim=1)


def _high_bits(qh: Tensor) -> Tensor:
    """Bit ``j`` of the little-endian uint32 ``qh`` is the fifth bit of weight ``j`` (shape ``(n, 32)``)."""
    # int32 wraps the top byte into the sign; an arithmetic shift still leaves bits 0..31 where they were
    word = torch.as_tensor(sum(_int(qh[:, i : i + 1]) << (8 * i) for i in range(4)), dtype=torch.int32)
    return (word >> torch.arange(32, dtype=torch.int32)) & 1


def _q4_0(blocks: Tensor) -> Tensor:
    # d: f16 | qs: u8[16]
    return _half(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8).float()


def _q4_1(blocks: Tensor) -> Tensor:
    # d: f16 | m: f16 | qs: u8[16]
    return _half(blocks, 0) * _nibbles(blocks[:, 4:]).float() + _half(blocks, 2)


def _q5_0(blocks: Tensor) -> Tensor:
    # d: f16 | qh: u32 | qs: u8[16]
    q = _nibbles(blocks[:, 6:]) | (_high_bits(blocks[:, 2:6]) << 4)
    return _half(blocks, 0) * (q - 16).float()


def _q5_1(blocks: Tensor) -> Tensor:
    # d: f16 | m: f16 | qh: u32 | qs: u8[16]
    q = _nibbles(blocks[:, 8:]) | (_high_bits(blocks[:, 4:8]) << 4)
    return _half(blocks, 0) * q.float() + _half(blocks, 2)


def _bits(x: Tensor, shifts: Tensor, width: int) -> Tensor:
    """``(x >> shift) & (2**width - 1)`` for every shift, on a new axis before the last."""
    # int32 shifts: an int64 shift would promote every code to int64 (four times the memory traffic)
    return (_int(x).unsqueeze(-2) >> shifts.to(torch.int32).view(-1, 1)) & ((1 << width) - 1)


def _q2_k(blocks: Tensor) -> Tensor:
    # scales: u8[16] (low nibble scale, high nibble min) | qs: u8[64] | d: f16 | dmin: f16
    n = blocks.shape[0]
    scales = _int(blocks[:, :16]).view(n, 2, 4, 2, 1)  # [half of 128, shift, 16-group]
    qs = blocks[:, 16:80].reshape(n, 2, 32)
    q = _bits(qs, torch.arange(0, 8, 2), 2).view(n, 2, 4, 2, 16).float()  # [half, shift, group, l]
    d, dmin = _half(blocks, 80).view(n, 1, 1, 1, 1), _half(blocks, 82).view(n, 1, 1, 1, 1)
    return ((d * (scales & 0xF).float()) * q - dmin * (scales >> 4).float()).reshape(n, QK_K)


def _q3_k_scales(packed: Tensor) -> Tensor:
    """Sixteen 6-bit scales from 12 bytes: low nibbles in bytes 0..7, the top 2 bits in bytes 8..11."""
    s = _int(packed)
    low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=1)
    high = torch.cat([(s[:, 8:12] >> shift) & 3 for shift in (0, 2, 4, 6)], dim=1)
    return (low | (high << 4)) - 32


def _q3_k(blocks: Tensor) -> Tensor:
    # hmask: u8[32] | qs: u8[64] | scales: 12 bytes of 6-bit values | d: f16
    n = blocks.shape[0]
    hbit = _bits(blocks[:, :32], torch.arange(8), 1).view(n, 2, 4, 32)  # bit 4*half + shift of hmask[l]
    q = _bits(blocks[:, 32:96].reshape(n, 2, 32), torch.arange(0, 8, 2), 2)  # [half, shift, l]
    q = (q - 4 * (1 - hbit)).view(n, 2, 4, 2, 16).float()
    scales = _q3_k_scales(blocks[:, 96:108]).view(n, 2, 4, 2, 1).float()
    d = _half(blocks, 108).view(n, 1, 1, 1, 1)
    return ((d * scales) * q).reshape(n, QK_K)


def _k4_scales(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Eight 6-bit scales and mins from 12 bytes (ggml's ``get_scale_min_k4``), shape ``(n, 8)`` each."""
    q = _int(packed)
    scales = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], dim=1)
    mins = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], dim=1)
    return scales, mins


def _q4_k(blocks: Tensor) -> Tensor:
    # d: f16 | dmin: f16 | scales: 12 bytes | qs: u8[128]
    n = blocks.shape[0]
    scales, mins = _k4_scales(blocks[:, 4:16])
    qs = _int(blocks[:, 16:]).view(n, 4, 32)
    q = torch.stack([qs & 0xF, qs >> 4], dim=2).view(n, 8, 32).float()  # 64 weights per 32 bytes: low, then high
    d, dmin = _half(blocks, 0).view(n, 1, 1), _half(blocks, 2).view(n, 1, 1)
    return ((d * scales.float().unsqueeze(-1)) * q - dmin * mins.float().unsqueeze(-1)).reshape(n, QK_K)


def _q5_k(blocks: Tensor) -> Tensor:
    # d: f16 | dmin: f16 | scales: 12 bytes | qh: u8[32] | qs: u8[128]
    n = blocks.shape[0]
    scales, mins = _k4_scales(blocks[:, 4:16])
    high = _bits(blocks[:, 16:48], torch.arange(8), 1)  # bit i of qh[l] tops sub-block i
    qs = _int(blocks[:, 48:]).view(n, 4, 32)
    q = (torch.stack([qs & 0xF, qs >> 4], dim=2).view(n, 8, 32) + 16 * high).float()
    d, dmin = _half(blocks, 0).view(n, 1, 1), _half(blocks, 2).view(n, 1, 1)
    return ((d * scales.float().unsqueeze(-1)) * q - dmin * mins.float().unsqueeze(-1)).reshape(n, QK_K)


def _q6_k(blocks: Tensor) -> Tensor:
    # ql: u8[128] | qh: u8[64] | scales: int8[16] | d: f16
    n = blocks.shape[0]
    ql = _int(blocks[:, :128]).view(n, 2, 2, 32)  # [half of 256, first/second 32 bytes, l]
    low = torch.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)
    high = _bits(blocks[:, 128:192].reshape(n, 2, 32), torch.arange(0, 8, 2), 2)
    q = ((low | (high << 4)) - 32).view(n, 2, 4, 2, 16).float()
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float().view(n, 2, 4, 2, 1)
    d = _half(blocks, 208).view(n, 1, 1, 1, 1)
    return ((d * scales) * q).reshape(n, QK_K)


@final
@dataclass(frozen=True, slots=True)
class BlockType:
    """One GGUF block type: weights per block, bytes per block, and the dequantizer of a block batch."""

    name: str
    block_size: int
    type_size: int
    dequantize: Callable[[Tensor], Tensor]


BLOCK_TYPES: Final[dict[str, BlockType]] = {
    t.name: t
    for t in (
        BlockType("Q4_0", QK, 18, _q4_0),
        BlockType("Q4_1", QK, 20, _q4_1),
        BlockType("Q5_0", QK, 22, _q5_0),
        BlockType("Q5_1", QK, 24, _q5_1),
        BlockType("Q8_0", QK, 34, _q8_0),
        BlockType("Q2_K", QK_K, 84, _q2_k),
        BlockType("Q3_K", QK_K, 110, _q3_k),
        BlockType("Q4_K", QK_K, 144, _q4_k),
        BlockType("Q5_K", QK_K, 176, _q5_k),
        BlockType("Q6_K", QK_K, 210, _q6_k),
    )
}
"""The quantized block types diffblocks reads, by ggml name."""

FLOAT_TYPES: Final[dict[str, torch.dtype]] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
"""GGUF types stored as plain floats, by ggml name."""


def dequantize(data: Tensor, type_name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """The weights of ``shape`` that ``data`` stores as ``type_name`` (raw ``uint8`` bytes, rows last).

    Args:
        data: ``uint8`` bytes, ``(..., bytes per row)`` for a block type; for a float type, the
            tensor itself (in its own dtype).
        type_name: a key of :data:`BLOCK_TYPES` or :data:`FLOAT_TYPES`.
        shape: the logical shape, ``(out_features, in_features)`` for a linear weight.
        dtype: of the result.
    """
    if type_name in FLOAT_TYPES:
        return data.to(dtype).reshape(shape)
    kind = BLOCK_TYPES[type_name]
    blocks = data.reshape(-1, kind.type_size)
    return kind.dequantize(blocks).to(dtype).reshape(shape)


__all__ = ["BLOCK_TYPES", "FLOAT_TYPES", "QK", "QK_K", "BlockType", "dequantize"]
