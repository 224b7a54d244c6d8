"""IP-Adapter scales per layer: diffusers' ``set_ip_adapter_scale`` forms, expanded to one scale per cross-attention layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from diffblocks.components.models.ip_adapter.model import cross_attention_layers

ScaleSpec = float | Mapping[str, "float | Sequence[float] | Mapping[str, float | Sequence[float]]"]
"""A scale for every layer, or ``{"down": ..., "mid": ..., "up": ...}`` with a scale, or ``{"block_i": scale or [one per attention]}``."""

_MSG_PART = "IP-Adapter scale names {got!r}; the parts are 'down', 'mid' and 'up'"
_MSG_BLOCK = "IP-Adapter scale names {part}.{block} but this UNet's {part} blocks with attention are {known}"
_MSG_LENGTH = "IP-Adapter scale for {part}.{block} has {got} values but that block has {want} attention layers: give one, or one per layer"


def expand_scales(unet: nn.Module, spec: ScaleSpec) -> tuple[float, ...]:
    """One scale per cross-attention layer of ``unet`` (in :func:`cross_attention_layers` order) from ``spec``.

    As in diffusers' ``set_ip_adapter_scale``: a number sets every layer; in a dict, the parts and
    blocks it does not name get 0.0, a block's scale acts on each of its spatial transformers (a
    list gives one per transformer), and every transformer block inside one shares its scale.

    Raises:
        ValueError: a part other than down/mid/up, a block that does not exist or has no attention
            (naming those that do), a list of the wrong length.

    Example:
        >>> from diffblocks.components.models.unet import UNet2DConditionModel
        >>> unet = UNet2DConditionModel.from_config({"block_out_channels": (8, 16), "layers_per_block": 1,
        ...     "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "norm_num_groups": 4,
        ...     "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 8, "attention_head_dim": 2})
        >>> expand_scales(unet, {"up": {"block_1": [0.0, 1.0]}})     # down.0, up.1 (two), mid
        (0.0, 0.0, 1.0, 0.0)
    """
    layers = [name for name, _ in cross_attention_layers(unet)]
    if not isinstance(spec, Mapping):
        return (float(spec),) * len(layers)
    for part in spec:
        if part not in ("down", "mid", "up"):
            raise ValueError(_MSG_PART.format(got=part))
    by_prefix: dict[str, float] = {}
    for part in ("down", "up"):
        value = spec.get(part, 0.0)
        blocks = _attention_blocks(unet, part)
        named = value if isinstance(value, Mapping) else {f"block_{i}": value for i in blocks}
        for block, scale in named.items():
            index = int(block.removeprefix("block_")) if block.startswith("block_") and block[6:].isdigit() else -1
            if index not in blocks:
                raise ValueError(_MSG_BLOCK.format(part=part, block=block, known=[f"block_{i}" for i in blocks] or "none"))
            count = blocks[index]
            scales = [float(s) for s in scale] if isinstance(scale, Sequence) else [float(scale)]
            if len(scales) == 1:
                scales *= count
            if len(scales) != count:
                raise ValueError(_MSG_LENGTH.format(part=part, block=block, got=len(scales), want=count))
            for j, s in enumerate(scales):
                by_prefix[f"{part}_blocks.{index}.attentions.{j}."] = s
    mid = spec.get("mid", 0.0)
    if isinstance(mid, Mapping) or (isinstance(mid, Sequence) and len(mid) != 1):
        raise ValueError(f"IP-Adapter scale for mid is one number, got {mid!r}")
    by_prefix["mid_block.attentions.0."] = float(mid[0] if isinstance(mid, Sequence) else mid)
    return tuple(next((s for prefix, s in by_prefix.items() if name.startswith(prefix)), 0.0) for name in layers)


def _attention_blocks(unet: nn.Module, part: str) -> dict[int, int]:
    """``{block index: number of spatial transformers}`` of the down or up blocks that have attention."""
    blocks = unet.get_submodule(f"{part}_blocks")
    found: dict[int, int] = {}
    for i, block in enumerate(blocks.children()):
        attentions = getattr(block, "attentions", None)
        if isinstance(attentions, nn.ModuleList) and len(attentions):
            found[i] = len(attentions)
    return found


__all__ = ["ScaleSpec", "expand_scales"]
