"""XLabs' Flux LoRA layout, rewritten into layouts :func:`~diffblocks.components.lora.formats.convert` reads.

XLabs (``x-flux``) trains LoRAs as attention processors, so its keys name a processor's layers:
``double_blocks.N.processor.qkv_lora1.down.weight`` (optionally under ``diffusion_model.``), with
``down.weight`` and ``up.weight`` and no ``alpha`` (diffusers reads them at scale 1, and so do we).
One table places each processor layer:

| XLabs layer | what it updates | read as |
|---|---|---|
| ``double_blocks.N.processor.qkv_lora1`` | image q, k, v (fused) | BFL ``double_blocks.N.img_attn.qkv`` |
| ``double_blocks.N.processor.qkv_lora2`` | text q, k, v (fused) | BFL ``double_blocks.N.txt_attn.qkv`` |
| ``double_blocks.N.processor.proj_lora1`` | image attention output | BFL ``double_blocks.N.img_attn.proj`` |
| ``double_blocks.N.processor.proj_lora2`` | text attention output | BFL ``double_blocks.N.txt_attn.proj`` |
| ``single_blocks.N.processor.qkv_lora`` | q, k, v of a single block | ours: ``single_transformer_blocks.N.attn.to_q``, ``to_k``, ``to_v`` |
| ``single_blocks.N.processor.proj_lora`` | a single block's output | BFL ``single_blocks.N.linear2`` |

The BFL names then go through the same table as a BFL checkpoint: a fused ``qkv`` update keeps
one ``down`` and its ``up`` is split by rows. A single block's ``qkv_lora`` has q, k and v only,
while BFL's ``linear1`` also holds the MLP input, so it is split here into three equal row blocks
(as diffusers' ``_convert_xlabs_flux_lora_to_diffusers`` does).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

_KEY = re.compile(
    r"^(?:diffusion_model\.)?(?P<kind>double|single)_blocks\.(?P<n>\d+)\.processor\.(?P<layer>(?:qkv|proj)_lora[12]?)\.(?P<part>down|up)\.weight$"
)
_DOUBLE = {"qkv_lora1": "img_attn.qkv", "qkv_lora2": "txt_attn.qkv", "proj_lora1": "img_attn.proj", "proj_lora2": "txt_attn.proj"}
_PARTS = {"down": "lora_down.weight", "up": "lora_up.weight"}


def is_xlabs(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether a LoRA file is in XLabs' layout (any key of a processor's ``down``/``up``)."""
    return any(_KEY.match(key) for key in state_dict)


def from_xlabs(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The file's tensors under the names of the table above; other keys are kept as they are (and so,
    when they name no layer, reported by ``convert``)."""
    if not is_xlabs(state_dict):
        return dict(state_dict)
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        found = _KEY.match(key)
        if found is None:
            out[key] = tensor
            continue
        n, layer, part = found["n"], found["layer"], found["part"]
        if found["kind"] == "double" and layer in _DOUBLE:
            out[f"diffusion_model.double_blocks.{n}.{_DOUBLE[layer]}.{_PARTS[part]}"] = tensor
        elif found["kind"] == "single" and layer == "proj_lora":
            out[f"diffusion_model.single_blocks.{n}.linear2.{_PARTS[part]}"] = tensor
        elif found["kind"] == "single" and layer == "qkv_lora":
            pieces = [tensor] * 3 if part == "down" else list(tensor.chunk(3, dim=0))
            for name, piece in zip(("to_q", "to_k", "to_v"), pieces, strict=True):
                out[f"transformer.single_transformer_blocks.{n}.attn.{name}.{_PARTS[part]}"] = piece
        else:
            out[key] = tensor  # e.g. qkv_lora1 of a single block: no such layer, reported as unknown
    return out


__all__ = ["from_xlabs", "is_xlabs"]
