"""The names a LoRA file may give a layer: diffusers' module paths, or the original code's.

diffusers/PEFT files name our layers as they are (``down_blocks.0.attentions.0.proj_in``). Files
trained with the original code name the layers of its checkpoints instead: LDM/SGM names for the
UNet (``input_blocks.4.1.proj_in``, how kohya names SDXL), BFL names for Flux
(``double_blocks.0.img_attn.qkv``), where one fused layer holds several of ours. The tables of the
single-file loader (:mod:`diffblocks.components.models.single_file`) already say where each of our
weights sits in those checkpoints; the same tables place each LoRA layer here, so a fused
projection's update is split by rows exactly as its weight is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import final

import torch
from torch import Tensor, nn

from diffblocks.components.models.base import AbstractModel
from diffblocks.components.models.flux import FluxTransformer2DModel
from diffblocks.components.models.single_file.bfl import transformer_table
from diffblocks.components.models.single_file.ldm import unet_table
from diffblocks.components.models.single_file.rules import Reshaped, Rows, Swapped, Table, Take
from diffblocks.components.models.unet import UNet2DConditionModel

ORIGINAL_TABLES: Mapping[type[nn.Module], Table] = {UNet2DConditionModel: unet_table, FluxTransformer2DModel: transformer_table}
"""The model classes whose original checkpoint layout LoRA files may use, with that layout's table."""


@final
@dataclass(frozen=True, slots=True)
class Target:
    """Where a file's LoRA layer lands: our module, and which rows of the update's ``up`` it takes.

    Args:
        module: our module path.
        rows: ``(start, stop)`` of a fused layer's output (Flux's ``qkv``), or None for all.
        swapped: the output's two halves are swapped (Flux's last modulation: shift and scale).
    """

    module: str
    rows: tuple[int, int] | None = None
    swapped: bool = False

    def up(self, up: Tensor) -> Tensor:
        """The part of the file's ``up`` matrix that updates this module."""
        if self.rows is not None:
            up = up[self.rows[0] : self.rows[1]]
        if self.swapped:
            first, second = up.chunk(2, dim=0)
            up = torch.cat([second, first], dim=0)
        return up


def layer_names(model: nn.Module, targets: list[str]) -> tuple[dict[str, tuple[Target, ...]], dict[str, tuple[Target, ...]]]:
    """``(diffusers names, original names)``: each a map from a file's layer name to the targets it updates."""
    ours = {name: (Target(name),) for name in targets}
    if _without_text_model(model):
        return ours, {f"text_model.{name}": (Target(name),) for name in targets}
    table = next((t for cls, t in ORIGINAL_TABLES.items() if isinstance(model, cls)), None)
    if table is None or not isinstance(model, AbstractModel):
        return ours, {}
    config = model.to_config()
    original: dict[str, list[Target]] = {}
    for name in targets:
        rule = table(name + ".weight", config)
        if rule is None:
            continue
        layer = rule.key.removesuffix(".weight")
        if isinstance(rule, (Take, Reshaped)):
            original.setdefault(layer, []).append(Target(name))
        elif isinstance(rule, Rows):
            original.setdefault(layer, []).append(Target(name, rows=(rule.start, rule.stop)))
        elif isinstance(rule, Swapped):
            original.setdefault(layer, []).append(Target(name, swapped=True))
    return ours, {layer: tuple(found) for layer, found in original.items()}


def _without_text_model(model: nn.Module) -> bool:
    """A transformers 5 ``CLIPTextModel``: built without the ``text_model`` level that checkpoints and LoRA files name."""
    from transformers import CLIPTextModel

    return isinstance(model, CLIPTextModel) and "text_model" not in dict(model.named_children())


__all__ = ["ORIGINAL_TABLES", "Target", "layer_names"]
