"""GGUF test files built here: float weights quantized by the ``gguf`` package, K-quant blocks packed by hand.

The ``gguf`` package quantizes Q4_0..Q8_0 (and BF16) but not the K-quants, so K-quant blocks are
written field by field in ggml's layout (``block_q2_K`` ... ``block_q6_K`` in ``ggml-common.h``):
random codes and scales, with small float16 super-block scales so the weights stay in a sane range.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

QK_K = 256
# bytes per 256-weight super-block, as the struct fields in order: (field, bytes)
_K_LAYOUTS: dict[str, tuple[tuple[str, int], ...]] = {
    "Q2_K": (("scales", 16), ("qs", 64), ("d", 2), ("dmin", 2)),
    "Q3_K": (("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2)),
    "Q4_K": (("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128)),
    "Q5_K": (("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32), ("qs", 128)),
    "Q6_K": (("ql", 128), ("qh", 64), ("scales", 16), ("d", 2)),
}
K_QUANTS = tuple(_K_LAYOUTS)


def k_quant_bytes(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """``(rows, cols / 256 * block bytes)`` random but valid ``type_name`` blocks."""
    assert cols % QK_K == 0, cols
    n = rows * cols // QK_K
    fields = []
    for name, size in _K_LAYOUTS[type_name]:
        if name in ("d", "dmin"):
            scale = rng.uniform(2e-6, 2e-5, size=n).astype(np.float16)
            fields.append(scale.view(np.uint8).reshape(n, 2))
        elif name == "scales" and type_name == "Q6_K":
            fields.append(rng.integers(-40, 40, size=(n, size), dtype=np.int8).view(np.uint8))
        else:
            fields.append(rng.integers(0, 256, size=(n, size), dtype=np.uint8))
    return np.concatenate(fields, axis=1).reshape(rows, -1)


def encode(type_name: str, weight: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
    """The stored form of ``weight`` (2-D for block types) as ``type_name``; K-quants ignore ``weight``'s values."""
    import gguf

    array = weight.detach().float().numpy()
    if type_name == "F32":
        return array
    if type_name == "F16":
        return array.astype(np.float16)
    if type_name in _K_LAYOUTS:
        return k_quant_bytes(type_name, array.shape[0], array.shape[1], rng)
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType[type_name])


def write_gguf(path: Path, tensors: Mapping[str, tuple[str, np.ndarray]]) -> Path:
    """Write ``{name: (type, stored array)}`` as a GGUF file (architecture ``flux``)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "flux")
    for name, (type_name, array) in tensors.items():
        raw = None if type_name in ("F32", "F16") else gguf.GGMLQuantizationType[type_name]
        writer.add_tensor(name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


Stored = tuple[str, np.ndarray]  # (ggml type name, the array as written)


def _cat(parts: list[Stored]) -> Stored:
    kinds = {kind for kind, _ in parts}
    assert len(kinds) == 1, kinds
    return parts[0][0], np.concatenate([array for _, array in parts])


def to_bfl(state: Mapping[str, Stored]) -> dict[str, Stored]:
    """Stored Flux tensors under diffusers' keys, re-keyed (and fused, by rows) into Black Forest Labs' layout."""
    out: dict[str, Stored] = {}
    renames = {
        "x_embedder": "img_in",
        "context_embedder": "txt_in",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "proj_out": "final_layer.linear",
    }
    for old, new in renames.items():
        for kind in ("weight", "bias"):
            if f"{old}.{kind}" in state:
                out[f"{new}.{kind}"] = state[f"{old}.{kind}"]
    for kind in ("weight", "bias"):
        name, scale_shift = state[f"norm_out.linear.{kind}"]
        half = scale_shift.shape[0] // 2
        out[f"final_layer.adaLN_modulation.1.{kind}"] = (name, np.concatenate([scale_shift[half:], scale_shift[:half]]))
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}
    for i in sorted(blocks):
        p = f"transformer_blocks.{i}."
        b = f"double_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{b}img_attn.qkv.{kind}"] = _cat([state[f"{p}attn.to_{x}.{kind}"] for x in "qkv"])
            out[f"{b}txt_attn.qkv.{kind}"] = _cat([state[f"{p}attn.add_{x}_proj.{kind}"] for x in "qkv"])
            for old, new in (
                ("norm1.linear", "img_mod.lin"),
                ("norm1_context.linear", "txt_mod.lin"),
                ("attn.to_out.0", "img_attn.proj"),
                ("attn.to_add_out", "txt_attn.proj"),
                ("ff.net.0.proj", "img_mlp.0"),
                ("ff.net.2", "img_mlp.2"),
                ("ff_context.net.0.proj", "txt_mlp.0"),
                ("ff_context.net.2", "txt_mlp.2"),
            ):
                out[f"{b}{new}.{kind}"] = state[f"{p}{old}.{kind}"]
        out[f"{b}img_attn.norm.query_norm.scale"] = state[f"{p}attn.norm_q.weight"]
        out[f"{b}img_attn.norm.key_norm.scale"] = state[f"{p}attn.norm_k.weight"]
        out[f"{b}txt_attn.norm.query_norm.scale"] = state[f"{p}attn.norm_added_q.weight"]
        out[f"{b}txt_attn.norm.key_norm.scale"] = state[f"{p}attn.norm_added_k.weight"]
    singles = {int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")}
    for i in sorted(singles):
        p = f"single_transformer_blocks.{i}."
        b = f"single_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{b}linear1.{kind}"] = _cat([state[f"{p}attn.to_{x}.{kind}"] for x in "qkv"] + [state[f"{p}proj_mlp.{kind}"]])
            out[f"{b}linear2.{kind}"] = state[f"{p}proj_out.{kind}"]
            out[f"{b}modulation.lin.{kind}"] = state[f"{p}norm.linear.{kind}"]
        out[f"{b}norm.query_norm.scale"] = state[f"{p}attn.norm_q.weight"]
        out[f"{b}norm.key_norm.scale"] = state[f"{p}attn.norm_k.weight"]
    return out


def stored(state: Mapping[str, torch.Tensor], weight_type: str, *, seed: int = 0) -> dict[str, Stored]:
    """``state`` as GGUF would store it: 2-D weights as ``weight_type`` where their rows allow, 1-D as F32.

    Rows too short for the type's blocks (the 64-wide patch embedding under a K-quant) fall back to
    Q8_0 or F32, as community files do.
    """
    rng = np.random.default_rng(seed)
    block = QK_K if weight_type in _K_LAYOUTS else 1 if weight_type in ("F32", "F16") else 32
    out: dict[str, Stored] = {}
    for name, tensor in state.items():
        kind = weight_type if tensor.ndim == 2 and tensor.shape[1] % block == 0 else "F32"
        if tensor.ndim == 2 and kind == "F32" and block > 1 and tensor.shape[1] % 32 == 0:
            kind = "Q8_0"
        out[name] = (kind, encode(kind, tensor, rng))
    return out
