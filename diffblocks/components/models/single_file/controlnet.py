"""The original ControlNet checkpoints (lllyasviel's ``control_v11p_sd15_*.pth`` and their kin) as one table.

A ControlNet file in the original layout holds the copied UNet encoder in LDM's own names
(``input_blocks``, ``middle_block``, ``time_embed``, SDXL's ``label_emb``: :data:`.ldm.UNET`
places them) and three parts of its own, under ``control_model.`` when it was cut out of a
training checkpoint, or at the top of the file when it was released alone (SD 2.x nets):

===================================  =====================================================
ours (diffusers' ``ControlNetModel``)  original
===================================  =====================================================
``controlnet_cond_embedding.conv_in``  ``input_hint_block.0``
``controlnet_cond_embedding.blocks.i`` ``input_hint_block.{2i + 2}`` (SiLUs between)
``controlnet_cond_embedding.conv_out`` ``input_hint_block.{2n + 2}`` for ``n`` blocks (14 in the releases)
``controlnet_down_blocks.i``           ``zero_convs.i.0``
``controlnet_mid_block``               ``middle_block_out.0``
===================================  =====================================================

The hint encoder's numbering is a ``nn.Sequential`` of convolutions with a SiLU after each but
the last, so a convolution sits at every even index.
"""

from __future__ import annotations

import re
from typing import Any

from diffblocks.components.models.single_file.layout import Layout, Part, Shapes
from diffblocks.components.models.single_file.ldm import Config, Row, infer_encoder, lookup, unet_table
from diffblocks.components.models.single_file.rules import Rule, Take


def _hint_blocks(config: Config) -> int:
    """How many convolutions sit between the hint encoder's first and last (two per width step)."""
    return 2 * (len(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))) - 1)


CONTROLNET: tuple[Row, ...] = (
    (r"controlnet_cond_embedding\.conv_in\.(?P<p>.+)", lambda m, c: Take(f"input_hint_block.0.{m['p']}")),
    (r"controlnet_cond_embedding\.blocks\.(?P<i>\d+)\.(?P<p>.+)", lambda m, c: Take(f"input_hint_block.{2 * int(m['i']) + 2}.{m['p']}")),
    (r"controlnet_cond_embedding\.conv_out\.(?P<p>.+)", lambda m, c: Take(f"input_hint_block.{2 * _hint_blocks(c) + 2}.{m['p']}")),
    (r"controlnet_down_blocks\.(?P<i>\d+)\.(?P<p>.+)", lambda m, c: Take(f"zero_convs.{m['i']}.0.{m['p']}")),
    (r"controlnet_mid_block\.(?P<p>.+)", lambda m, c: Take(f"middle_block_out.0.{m['p']}")),
)
"""ControlNetModel key (diffusers) -> original key, for the ControlNet's own layers."""

def controlnet_table(key: str, config: Config) -> Rule | None:
    """Where a ControlNet weight sits in the original file: its own layers, else the UNet encoder's LDM place."""
    return lookup(CONTROLNET, key, config) or unet_table(key, config)


def infer_controlnet(shapes: Shapes) -> dict[str, Any]:
    """The ControlNet's diffusers config from its shapes: the UNet encoder's, and the hint encoder's widths.

    The hint encoder's widths are the first convolution's output, then every second one's (the
    stride-2 convolutions that change the width); what the weights do not hold follows the
    released models, as for the UNet (:func:`.ldm.infer_encoder`).
    """
    hints = sorted(int(m[1]) for key in shapes if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", key)))
    convs = hints[:-1]  # the last is conv_out, to the first stage's width
    widths = (shapes[f"input_hint_block.{convs[0]}.weight"][0],) + tuple(
        shapes[f"input_hint_block.{i}.weight"][0] for i in convs[2::2]
    )
    return {
        **infer_encoder(shapes),
        "conditioning_channels": shapes["input_hint_block.0.weight"][1],
        "conditioning_embedding_out_channels": widths,
    }


CONTROLNET_PART = Part(
    "controlnet",
    "ControlNetModel",
    ("control_model.", ""),
    ("input_hint_block.0.weight", "zero_convs.0.0.weight", "middle_block_out.0.weight", "time_embed.0.weight"),
    controlnet_table,
    infer_controlnet,
)

CONTROL = Layout("control", "ControlNet (original: SD 1.x/2.x and SDXL ControlNets)", (CONTROLNET_PART,))


__all__ = ["CONTROL", "CONTROLNET", "CONTROLNET_PART", "controlnet_table", "infer_controlnet"]
