"""Key tables from GGUF community files to our models' (diffusers') state-dict keys.

Flux GGUF files (city96's and those made with the same script) keep Black Forest Labs' original
keys: fused ``qkv`` projections, ``linear1`` holding a single block's q, k, v and MLP input, and the
final modulation as ``(shift, scale)`` where diffusers stores ``(scale, shift)``. Each rule here
maps one file tensor to one or more model tensors by splitting *rows*. Quantized blocks never span
rows, so a row split of the raw bytes is the split of the weights, and the weights stay quantized.

The names come from the single-file BFL table (:mod:`diffblocks.components.models.single_file.bfl`),
the one source of Flux's key layout, read from BFL to diffusers. A file whose keys already are the
model's (diffusers layout) is read as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, final

from diffblocks.components.models.single_file.bfl import DOUBLE, EMBEDDERS, FINAL_MODULATION, FUSED_QKV, LINEAR1, SINGLE, TOP


def _flux_renames() -> tuple[tuple[str, str], ...]:
    """(pattern on the file key, replacement for the model key), from the single-file BFL table read backwards.

    BFL's RMSNorm weight is ``scale`` where diffusers' is ``weight``; everything else keeps its parameter name.
    """
    renames: list[tuple[str, str]] = [(rf"^{re.escape(bfl)}\.", f"{ours}.") for ours, bfl in TOP.items()]
    for embedder, bfl in EMBEDDERS.items():
        renames.append((rf"^{bfl}\.in_layer\.", f"time_text_embed.{embedder}.linear_1."))
        renames.append((rf"^{bfl}\.out_layer\.", f"time_text_embed.{embedder}.linear_2."))
    for blocks, ours_blocks, table in (("double_blocks", "transformer_blocks", DOUBLE), ("single_blocks", "single_transformer_blocks", SINGLE)):
        for ours, bfl in table.items():
            if bfl.endswith("_norm"):
                renames.append((rf"^{blocks}\.(\d+)\.{re.escape(bfl)}\.scale$", rf"{ours_blocks}.\1.{ours}.weight"))
            else:
                renames.append((rf"^{blocks}\.(\d+)\.{re.escape(bfl)}\.", rf"{ours_blocks}.\1.{ours}."))
    return tuple(renames)


# applied in order, first match wins (no two patterns match one key)
_FLUX_RENAMES: Final[tuple[tuple[str, str], ...]] = _flux_renames()
_QKV = re.compile(r"^double_blocks\.(\d+)\.(img|txt)_attn\.qkv\.(weight|bias)$")
_LINEAR1 = re.compile(r"^single_blocks\.(\d+)\.linear1\.(weight|bias)$")
_FINAL_MOD = re.compile(rf"^{re.escape(FINAL_MODULATION[1])}\.(weight|bias)$")


@final
@dataclass(frozen=True, slots=True)
class Split:
    """A file tensor whose rows become several model tensors, in order; ``rows`` of -1 takes the rest."""

    targets: tuple[str, ...]
    rows: tuple[int, ...]
    swap_halves: bool = False  # (shift, scale) -> (scale, shift): the two halves of the rows trade places


def flux_rule(key: str, *, inner_dim: int) -> str | Split | None:
    """Where BFL Flux file tensor ``key`` goes in our ``FluxTransformer2DModel``; None if it is not BFL."""
    if m := _QKV.match(key):
        block, stream, kind = m.groups()
        return Split(tuple(f"transformer_blocks.{block}.attn.{n}.{kind}" for n in FUSED_QKV[stream]), (inner_dim,) * 3)
    if m := _LINEAR1.match(key):
        block, kind = m.groups()
        return Split(tuple(f"single_transformer_blocks.{block}.{n}.{kind}" for n in LINEAR1), (inner_dim,) * 3 + (-1,))
    if m := _FINAL_MOD.match(key):
        return Split((f"{FINAL_MODULATION[0]}.{m.group(1)}",), (-1,), swap_halves=True)
    for pattern, replacement in _FLUX_RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


Rule = Callable[[str], "str | Split | None"]


def layout_rule(family: str, params: Mapping[str, object]) -> Rule:
    """The key rule for a model family's community GGUF layout (``"flux"``)."""
    if family == "flux":
        heads, head_dim = params["num_attention_heads"], params["attention_head_dim"]
        assert isinstance(heads, int) and isinstance(head_dim, int)
        inner_dim = heads * head_dim
        return lambda key: flux_rule(key, inner_dim=inner_dim)
    raise ValueError(f"no community GGUF layout is known for {family!r}; files in diffusers' layout load as they are")


__all__ = ["Rule", "Split", "flux_rule", "layout_rule"]
