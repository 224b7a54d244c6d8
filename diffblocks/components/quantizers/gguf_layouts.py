"""Key tables from GGUF community files to our models' (diffusers') state-dict keys.

Flux GGUF files (city96's and those made with the same script) keep Black Forest Labs' original
keys: fused ``qkv`` projections, ``linear1`` holding a single block's q, k, v and MLP input, and the
final modulation as ``(shift, scale)`` where diffusers stores ``(scale, shift)``. Each rule here
maps one file tensor to one or more model tensors by splitting *rows*. Quantized blocks never span
rows, so a row split of the raw bytes is the split of the weights, and the weights stay quantized.

A file whose keys already are the model's (diffusers layout) is read as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, final

# (pattern on the file key, replacement for the model key); applied in order, first match wins.
_FLUX_RENAMES: Final[tuple[tuple[str, str], ...]] = (
    (r"^img_in\.", "x_embedder."),
    (r"^txt_in\.", "context_embedder."),
    (r"^time_in\.in_layer\.", "time_text_embed.timestep_embedder.linear_1."),
    (r"^time_in\.out_layer\.", "time_text_embed.timestep_embedder.linear_2."),
    (r"^guidance_in\.in_layer\.", "time_text_embed.guidance_embedder.linear_1."),
    (r"^guidance_in\.out_layer\.", "time_text_embed.guidance_embedder.linear_2."),
    (r"^vector_in\.in_layer\.", "time_text_embed.text_embedder.linear_1."),
    (r"^vector_in\.out_layer\.", "time_text_embed.text_embedder.linear_2."),
    (r"^final_layer\.linear\.", "proj_out."),
    (r"^double_blocks\.(\d+)\.img_mod\.lin\.", r"transformer_blocks.\1.norm1.linear."),
    (r"^double_blocks\.(\d+)\.txt_mod\.lin\.", r"transformer_blocks.\1.norm1_context.linear."),
    (r"^double_blocks\.(\d+)\.img_attn\.norm\.query_norm\.scale$", r"transformer_blocks.\1.attn.norm_q.weight"),
    (r"^double_blocks\.(\d+)\.img_attn\.norm\.key_norm\.scale$", r"transformer_blocks.\1.attn.norm_k.weight"),
    (r"^double_blocks\.(\d+)\.txt_attn\.norm\.query_norm\.scale$", r"transformer_blocks.\1.attn.norm_added_q.weight"),
    (r"^double_blocks\.(\d+)\.txt_attn\.norm\.key_norm\.scale$", r"transformer_blocks.\1.attn.norm_added_k.weight"),
    (r"^double_blocks\.(\d+)\.img_attn\.proj\.", r"transformer_blocks.\1.attn.to_out.0."),
    (r"^double_blocks\.(\d+)\.txt_attn\.proj\.", r"transformer_blocks.\1.attn.to_add_out."),
    (r"^double_blocks\.(\d+)\.img_mlp\.0\.", r"transformer_blocks.\1.ff.net.0.proj."),
    (r"^double_blocks\.(\d+)\.img_mlp\.2\.", r"transformer_blocks.\1.ff.net.2."),
    (r"^double_blocks\.(\d+)\.txt_mlp\.0\.", r"transformer_blocks.\1.ff_context.net.0.proj."),
    (r"^double_blocks\.(\d+)\.txt_mlp\.2\.", r"transformer_blocks.\1.ff_context.net.2."),
    (r"^single_blocks\.(\d+)\.modulation\.lin\.", r"single_transformer_blocks.\1.norm.linear."),
    (r"^single_blocks\.(\d+)\.norm\.query_norm\.scale$", r"single_transformer_blocks.\1.attn.norm_q.weight"),
    (r"^single_blocks\.(\d+)\.norm\.key_norm\.scale$", r"single_transformer_blocks.\1.attn.norm_k.weight"),
    (r"^single_blocks\.(\d+)\.linear2\.", r"single_transformer_blocks.\1.proj_out."),
)
_QKV = re.compile(r"^double_blocks\.(\d+)\.(img|txt)_attn\.qkv\.(weight|bias)$")
_LINEAR1 = re.compile(r"^single_blocks\.(\d+)\.linear1\.(weight|bias)$")
_FINAL_MOD = re.compile(r"^final_layer\.adaLN_modulation\.1\.(weight|bias)$")


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
        names = ("to_q", "to_k", "to_v") if stream == "img" else ("add_q_proj", "add_k_proj", "add_v_proj")
        return Split(tuple(f"transformer_blocks.{block}.attn.{n}.{kind}" for n in names), (inner_dim,) * 3)
    if m := _LINEAR1.match(key):
        block, kind = m.groups()
        names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        return Split(tuple(f"single_transformer_blocks.{block}.{n}.{kind}" for n in names), (inner_dim,) * 3 + (-1,))
    if m := _FINAL_MOD.match(key):
        return Split((f"norm_out.linear.{m.group(1)}",), (-1,), swap_halves=True)
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
