"""The BFL layout of Flux.1 dev and schnell checkpoints (Black Forest Labs' reference code).

BFL's own files hold the transformer alone, at the top level; ComfyUI's all-in-one files put it
under ``model.diffusion_model.`` beside the VAE (``vae.``, LDM's VAE names) and the text encoders
in transformers' names (``text_encoders.clip_l.transformer.``, ``text_encoders.t5xxl.transformer.``).
BFL's ``ae.safetensors`` is the VAE alone in LDM's names.

BFL fuses what diffusers keeps apart: ``img_attn.qkv`` is the image stream's query, key and value;
a single block's ``linear1`` is query, key, value and the MLP input; the final modulation stores
shift before scale, where diffusers' ``AdaLayerNormContinuous`` reads scale first.
"""

from __future__ import annotations

import re
from typing import Any

from diffblocks.components.models.single_file.layout import Layout, Part, Shapes
from diffblocks.components.models.single_file.ldm import VAE_PART, Config, Row, clip_table, lookup
from diffblocks.components.models.single_file.rules import Rows, Rule, Swapped, Take

EMBEDDERS = {"timestep_embedder": "time_in", "text_embedder": "vector_in", "guidance_embedder": "guidance_in"}
"""diffusers' ``time_text_embed`` parts -> BFL's embedders (``linear_1``/``linear_2`` -> ``in_layer``/``out_layer``)."""

DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
"""A double block's layers, diffusers -> BFL (BFL's RMSNorm weight is ``scale``); q, k, v are fused below."""

SINGLE = {"norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm", "proj_out": "linear2"}
"""A single block's layers, diffusers -> BFL; q, k, v and the MLP input are fused in ``linear1``."""

TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear"}
"""The model's outer layers, diffusers -> BFL (the final modulation is ``norm_out.linear``, swapped below)."""

FINAL_MODULATION = ("norm_out.linear", "final_layer.adaLN_modulation.1")
"""diffusers' final modulation (scale, shift) and BFL's (shift, scale): the two halves of its rows trade places."""

FUSED_QKV = {"img": ("to_q", "to_k", "to_v"), "txt": ("add_q_proj", "add_k_proj", "add_v_proj")}
"""A double block's ``{stream}_attn.qkv`` rows, in order: the ``attn`` projections each stream's third holds."""

LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
"""A single block's ``linear1`` rows, in order: q, k, v (``inner_dim`` rows each), then the 4x wide MLP input."""

_QKV = {name.rpartition(".")[2]: i for names in (*FUSED_QKV.values(), LINEAR1) for i, name in enumerate(names)}


def _inner(c: Config) -> int:
    return int(c["num_attention_heads"]) * int(c["attention_head_dim"])


def _double_qkv(m: re.Match[str], c: Config) -> Rule:
    stream = "txt" if m["x"].startswith("add_") else "img"
    index, d = _QKV[m["x"]], _inner(c)
    return Rows(f"double_blocks.{m['i']}.{stream}_attn.qkv.{m['p']}", index * d, (index + 1) * d)


def _single_linear1(m: re.Match[str], c: Config) -> Rule:
    index, d = _QKV[m["x"]], _inner(c)
    stop = (index + 1) * d if index < 3 else 3 * d + 4 * d  # the MLP is 4x wide
    return Rows(f"single_blocks.{m['i']}.linear1.{m['p']}", index * d, stop)


def _norm_param(layer: str, p: str) -> str:
    return "scale" if layer.endswith("_norm") else p


TRANSFORMER: tuple[Row, ...] = (
    (
        r"time_text_embed\.(?P<e>\w+_embedder)\.linear_(?P<n>[12])\.(?P<p>.+)",
        lambda m, c: Take(f"{EMBEDDERS[m['e']]}.{'in_layer' if m['n'] == '1' else 'out_layer'}.{m['p']}"),
    ),
    (r"(?P<l>context_embedder|x_embedder)\.(?P<p>.+)", lambda m, c: Take(f"{TOP[m['l']]}.{m['p']}")),
    (r"transformer_blocks\.(?P<i>\d+)\.attn\.(?P<x>to_[qkv]|add_[qkv]_proj)\.(?P<p>weight|bias)", _double_qkv),
    (
        r"transformer_blocks\.(?P<i>\d+)\.(?P<l>.+)\.(?P<p>weight|bias)",
        lambda m, c: Take(f"double_blocks.{m['i']}.{DOUBLE[m['l']]}.{_norm_param(DOUBLE[m['l']], m['p'])}"),
    ),
    (r"single_transformer_blocks\.(?P<i>\d+)\.(attn\.)?(?P<x>to_[qkv]|proj_mlp)\.(?P<p>weight|bias)", _single_linear1),
    (
        r"single_transformer_blocks\.(?P<i>\d+)\.(?P<l>.+)\.(?P<p>weight|bias)",
        lambda m, c: Take(f"single_blocks.{m['i']}.{SINGLE[m['l']]}.{_norm_param(SINGLE[m['l']], m['p'])}"),
    ),
    (r"proj_out\.(?P<p>.+)", lambda m, c: Take(f"{TOP['proj_out']}.{m['p']}")),
    (r"norm_out\.linear\.(?P<p>.+)", lambda m, c: Swapped(f"{FINAL_MODULATION[1]}.{m['p']}")),
)
"""FluxTransformer2DModel key (diffusers) -> BFL key."""


def transformer_table(key: str, config: Config) -> Rule | None:
    return lookup(TRANSFORMER, key, config)


def t5_table(key: str, config: Config) -> Rule | None:
    """T5 is stored in transformers' names; the token embedding is tied, saved once as ``shared``."""
    return Take("shared.weight" if key == "encoder.embed_tokens.weight" else key)


def _blocks(shapes: Shapes, name: str) -> int:
    return len({m[1] for key in shapes if (m := re.match(rf"{name}\.(\d+)\.", key))})


def infer_transformer(shapes: Shapes) -> dict[str, Any]:
    """The transformer's diffusers config from a BFL transformer's shapes.

    The RoPE axes are not in the weights: Flux.1's (16, 56, 56) are taken for 128-channel heads;
    other models need ``config=``.
    """
    inner, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    if head_dim != 128:
        raise ValueError(
            f"the Flux transformer has {head_dim}-channel heads, not Flux.1's 128, so its RoPE axes cannot be "
            "inferred; pass config= a folder or Hub id with its transformer/config.json"
        )
    return {
        "in_channels": in_channels,
        "num_layers": _blocks(shapes, "double_blocks"),
        "num_single_layers": _blocks(shapes, "single_blocks"),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": shapes["txt_in.weight"][1],
        "pooled_projection_dim": shapes["vector_in.in_layer.weight"][1],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        "axes_dims_rope": (16, 56, 56),
    }


TRANSFORMER_PART = Part(
    "transformer",
    "FluxTransformer2DModel",
    ("model.diffusion_model.", ""),
    ("img_in.weight", "txt_in.weight", "double_blocks.0.img_attn.qkv.weight", "final_layer.linear.weight"),
    transformer_table,
    infer_transformer,
)

BFL = Layout(
    "bfl",
    "BFL (Black Forest Labs: Flux.1 dev and schnell)",
    (
        TRANSFORMER_PART,
        VAE_PART,
        Part(
            "text_encoder",
            "CLIPTextModel",
            ("text_encoders.clip_l.transformer.",),
            ("text_model.embeddings.token_embedding.weight", "text_model.final_layer_norm.weight"),
            clip_table,
        ),
        Part("text_encoder_2", "T5EncoderModel", ("text_encoders.t5xxl.transformer.",), ("shared.weight",), t5_table),
    ),
)


def is_bfl(shapes: Shapes) -> bool:
    return TRANSFORMER_PART.prefix_in(shapes) is not None


def has_guidance(shapes: Shapes) -> bool:
    """dev embeds the distilled guidance scale; schnell does not."""
    return any(key.endswith("guidance_in.in_layer.weight") for key in shapes)


__all__ = [
    "BFL",
    "DOUBLE",
    "EMBEDDERS",
    "FINAL_MODULATION",
    "FUSED_QKV",
    "LINEAR1",
    "SINGLE",
    "TOP",
    "TRANSFORMER",
    "TRANSFORMER_PART",
    "has_guidance",
    "infer_transformer",
    "is_bfl",
    "t5_table",
    "transformer_table",
]
