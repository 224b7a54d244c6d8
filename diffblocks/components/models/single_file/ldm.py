"""The LDM (CompVis) layout of Stable Diffusion 1.x and 2.x checkpoints, as one table per model.

An LDM file holds the UNet under ``model.diffusion_model.``, the VAE under ``first_stage_model.``
and the text encoder under ``cond_stage_model.``: OpenAI CLIP in transformers' own names
(``cond_stage_model.transformer.``, SD 1.x) or OpenCLIP (``cond_stage_model.model.``, SD 2.x).
SDXL files (:mod:`.sgm`) use the same UNet and VAE tables under other text-encoder prefixes.

The UNet numbers its blocks flat: ``input_blocks.0`` is ``conv_in``; then, per resolution level,
one ``input_blocks.i`` per layer (``.0`` its resnet, ``.1`` its attention) and one more for the
downsampler (``.0.op``). ``output_blocks`` count the same way with one extra layer per level, the
upsampler sitting after the attention (``.2.conv``) or, without one, after the resnet
(``.1.conv``). ``middle_block`` is resnet, attention, resnet. The attention blocks inside keep
diffusers' names; the resnets' layers are renamed (:data:`RESNET`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from diffblocks.components.models.single_file.layout import Layout, Part, Shapes
from diffblocks.components.models.single_file.rules import Reshaped, Rows, Rule, Take, Transposed

RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
"""diffusers' resnet layer -> LDM's, in the UNet."""

VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
"""diffusers' VAE attention layer -> LDM's (1x1 convolutions there, linear layers here)."""

Config = Mapping[str, Any]
Row = tuple[str, Callable[[re.Match[str], Config], Rule]]

_RES = r"(?P<name>norm1|conv1|time_emb_proj|norm2|conv2|conv_shortcut)\.(?P<p>weight|bias)"


def _layers(config: Config) -> tuple[int, ...]:
    n = config.get("layers_per_block", 2)
    return tuple(n) if isinstance(n, (list, tuple)) else (n,) * len(config["block_out_channels"])


def _down(config: Config, level: int, layer: int) -> int:
    """``input_blocks`` index of a down block's layer (0 is ``conv_in``)."""
    return 1 + sum(n + 1 for n in _layers(config)[:level]) + layer


def _up(config: Config, level: int, layer: int) -> int:
    """``output_blocks`` index of an up block's layer (up blocks have one layer more than down blocks)."""
    return sum(n + 1 for n in _layers(config)[::-1][:level]) + layer


def _upsampler(m: re.Match[str], c: Config) -> Rule:
    level = int(m["b"])
    slot = 2 if c["up_block_types"][level].startswith("CrossAttn") else 1
    return Take(f"output_blocks.{_up(c, level, _layers(c)[::-1][level])}.{slot}.conv.{m['p']}")


UNET: tuple[Row, ...] = (
    (r"conv_in\.(?P<p>.+)", lambda m, c: Take(f"input_blocks.0.0.{m['p']}")),
    (r"time_embedding\.linear_1\.(?P<p>.+)", lambda m, c: Take(f"time_embed.0.{m['p']}")),
    (r"time_embedding\.linear_2\.(?P<p>.+)", lambda m, c: Take(f"time_embed.2.{m['p']}")),
    (r"add_embedding\.linear_1\.(?P<p>.+)", lambda m, c: Take(f"label_emb.0.0.{m['p']}")),
    (r"add_embedding\.linear_2\.(?P<p>.+)", lambda m, c: Take(f"label_emb.0.2.{m['p']}")),
    (
        rf"down_blocks\.(?P<b>\d+)\.resnets\.(?P<r>\d+)\.{_RES}",
        lambda m, c: Take(f"input_blocks.{_down(c, int(m['b']), int(m['r']))}.0.{RESNET[m['name']]}.{m['p']}"),
    ),
    (
        r"down_blocks\.(?P<b>\d+)\.attentions\.(?P<r>\d+)\.(?P<rest>.+)",
        lambda m, c: Take(f"input_blocks.{_down(c, int(m['b']), int(m['r']))}.1.{m['rest']}"),
    ),
    (
        r"down_blocks\.(?P<b>\d+)\.downsamplers\.0\.conv\.(?P<p>.+)",
        lambda m, c: Take(f"input_blocks.{_down(c, int(m['b']), _layers(c)[int(m['b'])])}.0.op.{m['p']}"),
    ),
    (rf"mid_block\.resnets\.(?P<r>\d)\.{_RES}", lambda m, c: Take(f"middle_block.{2 * int(m['r'])}.{RESNET[m['name']]}.{m['p']}")),
    (r"mid_block\.attentions\.0\.(?P<rest>.+)", lambda m, c: Take(f"middle_block.1.{m['rest']}")),
    (
        rf"up_blocks\.(?P<b>\d+)\.resnets\.(?P<r>\d+)\.{_RES}",
        lambda m, c: Take(f"output_blocks.{_up(c, int(m['b']), int(m['r']))}.0.{RESNET[m['name']]}.{m['p']}"),
    ),
    (
        r"up_blocks\.(?P<b>\d+)\.attentions\.(?P<r>\d+)\.(?P<rest>.+)",
        lambda m, c: Take(f"output_blocks.{_up(c, int(m['b']), int(m['r']))}.1.{m['rest']}"),
    ),
    (r"up_blocks\.(?P<b>\d+)\.upsamplers\.0\.conv\.(?P<p>.+)", _upsampler),
    (r"conv_norm_out\.(?P<p>.+)", lambda m, c: Take(f"out.0.{m['p']}")),
    (r"conv_out\.(?P<p>.+)", lambda m, c: Take(f"out.2.{m['p']}")),
)
"""UNet2DConditionModel key (diffusers) -> LDM ``model.diffusion_model`` key."""


def _vae_up(m: re.Match[str], c: Config) -> int:
    return len(c["block_out_channels"]) - 1 - int(m["i"])  # LDM numbers the decoder's levels from the bottom


VAE: tuple[Row, ...] = (
    (r"(?P<k>(en|de)coder\.conv_(in|out)\..+|(post_)?quant_conv\..+)", lambda m, c: Take(m["k"])),
    (r"(?P<c>encoder|decoder)\.conv_norm_out\.(?P<p>.+)", lambda m, c: Take(f"{m['c']}.norm_out.{m['p']}")),
    (
        r"encoder\.down_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.(?P<rest>.+)",
        lambda m, c: Take(f"encoder.down.{m['i']}.block.{m['j']}.{m['rest'].replace('conv_shortcut', 'nin_shortcut')}"),
    ),
    (
        r"encoder\.down_blocks\.(?P<i>\d+)\.downsamplers\.0\.conv\.(?P<p>.+)",
        lambda m, c: Take(f"encoder.down.{m['i']}.downsample.conv.{m['p']}"),
    ),
    (
        r"decoder\.up_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.(?P<rest>.+)",
        lambda m, c: Take(f"decoder.up.{_vae_up(m, c)}.block.{m['j']}.{m['rest'].replace('conv_shortcut', 'nin_shortcut')}"),
    ),
    (
        r"decoder\.up_blocks\.(?P<i>\d+)\.upsamplers\.0\.conv\.(?P<p>.+)",
        lambda m, c: Take(f"decoder.up.{_vae_up(m, c)}.upsample.conv.{m['p']}"),
    ),
    (
        r"(?P<c>encoder|decoder)\.mid_block\.resnets\.(?P<j>\d)\.(?P<rest>.+)",
        lambda m, c: Take(f"{m['c']}.mid.block_{int(m['j']) + 1}.{m['rest'].replace('conv_shortcut', 'nin_shortcut')}"),
    ),
    (
        r"(?P<c>encoder|decoder)\.mid_block\.attentions\.0\.(?P<n>group_norm|to_q|to_k|to_v|to_out\.0)\.(?P<p>.+)",
        lambda m, c: Reshaped(f"{m['c']}.mid.attn_1.{VAE_ATTENTION[m['n']]}.{m['p']}"),
    ),
)
"""AutoencoderKL key (diffusers) -> LDM ``first_stage_model`` key."""


def _hidden(c: Config) -> int:
    return int(c["hidden_size"])


def _block(m: re.Match[str], layer: str) -> str:
    return f"transformer.resblocks.{m['i']}.{layer}.{m['p']}"


def _qkv(m: re.Match[str], c: Config) -> Rule:
    index, d = "qkv".index(m["x"]), _hidden(c)
    return Rows(f"transformer.resblocks.{m['i']}.attn.in_proj_{m['p']}", index * d, (index + 1) * d)


OPEN_CLIP: tuple[Row, ...] = (
    (r"embeddings\.token_embedding\.weight", lambda m, c: Take("token_embedding.weight")),
    (r"embeddings\.position_embedding\.weight", lambda m, c: Take("positional_embedding")),
    (r"encoder\.layers\.(?P<i>\d+)\.self_attn\.(?P<x>[qkv])_proj\.(?P<p>weight|bias)", _qkv),
    (r"encoder\.layers\.(?P<i>\d+)\.self_attn\.out_proj\.(?P<p>.+)", lambda m, c: Take(_block(m, "attn.out_proj"))),
    (r"encoder\.layers\.(?P<i>\d+)\.layer_norm1\.(?P<p>.+)", lambda m, c: Take(_block(m, "ln_1"))),
    (r"encoder\.layers\.(?P<i>\d+)\.layer_norm2\.(?P<p>.+)", lambda m, c: Take(_block(m, "ln_2"))),
    (r"encoder\.layers\.(?P<i>\d+)\.mlp\.fc1\.(?P<p>.+)", lambda m, c: Take(_block(m, "mlp.c_fc"))),
    (r"encoder\.layers\.(?P<i>\d+)\.mlp\.fc2\.(?P<p>.+)", lambda m, c: Take(_block(m, "mlp.c_proj"))),
    (r"final_layer_norm\.(?P<p>.+)", lambda m, c: Take(f"ln_final.{m['p']}")),
    (r"text_projection\.weight", lambda m, c: Transposed("text_projection")),
)
"""transformers CLIP text model key (``text_model.`` removed) -> OpenCLIP key. SD 2.x files hold a
24th layer that diffusers' encoder drops (SD 2 conditions on the penultimate layer); it is not read."""


def lookup(rows: tuple[Row, ...], key: str, config: Config) -> Rule | None:
    """The rule of the first row whose pattern is the whole of ``key``."""
    for pattern, rule in rows:
        match = re.fullmatch(pattern, key)
        if match:
            try:
                return rule(match, config)
            except KeyError:  # a layer the layout does not name (``DOUBLE[...]``): the model is not of this layout
                return None
    return None


def unet_table(key: str, config: Config) -> Rule | None:
    return lookup(UNET, key, config)


def vae_table(key: str, config: Config) -> Rule | None:
    return lookup(VAE, key, config)


def clip_table(key: str, config: Config) -> Rule | None:
    """OpenAI CLIP is stored in transformers' own names, under ``text_model.`` as CLIPTextModel once had it."""
    return Take(key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}")


def open_clip_table(key: str, config: Config) -> Rule | None:
    return lookup(OPEN_CLIP, key.removeprefix("text_model."), config)


def _count(shapes: Shapes, pattern: str) -> int:
    found = {m[1] for key in shapes if (m := re.match(pattern, key))}
    return len(found)


def infer_unet(shapes: Shapes) -> dict[str, Any]:
    """The UNet's diffusers config from an LDM UNet's shapes: its encoder's (:func:`infer_encoder`) and its decoder's."""
    config = infer_encoder(shapes)
    down = config["down_block_types"]
    flip = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
    return {**config, "out_channels": shapes["out.2.weight"][0], "up_block_types": tuple(flip[kind] for kind in reversed(down))}


def infer_encoder(shapes: Shapes) -> dict[str, Any]:
    """The diffusers config of an LDM UNet's encoder and mid block, from their shapes (a ControlNet has these only).

    What the weights do not hold follows the released models: 8 heads with convolution
    projections (SD 1.x), else heads of 64 channels (SD 2.x, SDXL); SDXL's time ids are embedded
    with 256 channels each. Pass ``config=`` for models that differ.
    """
    levels = _count(shapes, r"input_blocks\.(\d+)\.0\.op\.weight") + 1
    blocks = _count(shapes, r"input_blocks\.(\d+)\.")
    layers = (blocks - 1 - (levels - 1)) // levels
    first = [1 + level * (layers + 1) for level in range(levels)]
    channels = tuple(shapes[f"input_blocks.{i}.0.out_layers.3.weight"][0] for i in first)
    attention = [f"input_blocks.{i}.1.proj_in.weight" in shapes for i in first]
    depth = tuple(_count(shapes, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.") or 1 for i in first)
    context = next(shape[-1] for key, shape in shapes.items() if key.endswith("attn2.to_k.weight"))
    linear = len(next(shape for key, shape in shapes.items() if key.endswith("proj_in.weight"))) == 2
    config: dict[str, Any] = {
        "in_channels": shapes["input_blocks.0.0.weight"][1],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        "cross_attention_dim": context,
        "use_linear_projection": linear,
        "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else depth,
        "attention_head_dim": tuple(max(c // 64, 1) for c in channels) if linear else 8,
    }
    if "label_emb.0.0.weight" in shapes:
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=shapes["label_emb.0.0.weight"][1],
        )
    return config


def infer_vae(shapes: Shapes) -> dict[str, Any]:
    """The VAE's diffusers config from an LDM VAE's shapes (scaling factors are the family's: see the presets)."""
    levels = _count(shapes, r"encoder\.down\.(\d+)\.")
    return {
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "block_out_channels": tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)),
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "layers_per_block": _count(shapes, r"encoder\.down\.0\.block\.(\d+)\."),
        "latent_channels": shapes["decoder.conv_in.weight"][1],
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in shapes,
    }


UNET_PART = Part(
    "unet",
    "UNet2DConditionModel",
    ("model.diffusion_model.", ""),
    ("input_blocks.0.0.weight", "time_embed.0.weight", "middle_block.0.in_layers.0.weight", "out.2.weight"),
    unet_table,
    infer_unet,
)
VAE_PART = Part(
    "vae",
    "AutoencoderKL",
    ("first_stage_model.", "vae.", ""),
    ("encoder.conv_in.weight", "encoder.mid.block_1.conv1.weight", "decoder.conv_out.weight", "decoder.mid.block_2.conv2.weight"),
    vae_table,
    infer_vae,
)
_CLIP_SIGNATURE = ("text_model.embeddings.token_embedding.weight", "text_model.final_layer_norm.weight")
_OPEN_CLIP_SIGNATURE = ("token_embedding.weight", "positional_embedding", "ln_final.weight")

LDM = Layout(
    "ldm",
    "LDM (CompVis: Stable Diffusion 1.x/2.x)",
    (
        UNET_PART,
        VAE_PART,
        Part("text_encoder", "CLIPTextModel", ("cond_stage_model.transformer.",), _CLIP_SIGNATURE, clip_table),
        Part("text_encoder", "CLIPTextModel", ("cond_stage_model.model.",), _OPEN_CLIP_SIGNATURE, open_clip_table),
    ),
)


def sd_version(shapes: Shapes) -> str:
    """``"sd2"`` for OpenCLIP-conditioned files (or UNets with linear projections or 1024-wide context), else ``"sd1"``."""
    if any(key.startswith("cond_stage_model.model.") for key in shapes):
        return "sd2"
    if any(key.startswith("cond_stage_model.transformer.") for key in shapes):
        return "sd1"
    unet = UNET_PART.shapes(shapes, "model.diffusion_model.")
    config = infer_unet(unet)
    return "sd2" if config["use_linear_projection"] or config["cross_attention_dim"] == 1024 else "sd1"


__all__ = [
    "LDM",
    "OPEN_CLIP",
    "RESNET",
    "UNET",
    "UNET_PART",
    "VAE",
    "VAE_ATTENTION",
    "VAE_PART",
    "clip_table",
    "infer_encoder",
    "infer_unet",
    "infer_vae",
    "lookup",
    "open_clip_table",
    "sd_version",
    "unet_table",
    "vae_table",
]
