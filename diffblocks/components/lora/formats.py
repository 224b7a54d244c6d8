"""LoRA file layouts, each read through one conversion table into ``{module path: LoRAWeights}``.

Two layouts circulate for the UNet (SD 1.x, SDXL) and the Flux transformer:

| layout | a key | module path | down, up, alpha |
|---|---|---|---|
| diffusers / PEFT (``pytorch_lora_weights.safetensors``) | ``unet.down_blocks.0.attentions.0.proj_in.lora_A.weight`` | after the prefix ``unet.`` or ``transformer.`` | ``lora_A.weight``, ``lora_B.weight``, ``alpha`` (optional) |
| kohya / sd-scripts (and LoCon) | ``lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight`` | after ``lora_unet_``, the module whose path with ``.`` written ``_`` matches | ``lora_down.weight``, ``lora_up.weight``, ``alpha`` |

A missing ``alpha`` means ``alpha = rank`` (scale 1), as in PEFT's default config. Every key of
a file must fall into the table; any that does not is named in the error, never dropped.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, final

import torch
from safetensors.torch import load_file
from torch import Tensor

Layout = Literal["peft", "kohya"]

PEFT_PREFIXES = ("unet.", "transformer.")
PEFT_PARTS: Mapping[str, str] = {"lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha"}
KOHYA_PREFIX = "lora_unet_"
KOHYA_PARTS: Mapping[str, str] = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}

_MSG_PICKLE = (
    "{path} is a pickle; loading one can run code hidden in it. Prefer the .safetensors file, or pass "
    "allow_pickle=True if you trust its source (it is then read with torch.load(weights_only=True))"
)
_MSG_UNKNOWN = (
    "{count} key(s) of this LoRA file match no layer of {model} in the {layout} layout: {keys}. The file is "
    "for another model (a text encoder, another family) or in a layout diffblocks does not read yet; "
    "nothing was loaded"
)


@final
@dataclass(frozen=True, slots=True)
class LoRAWeights:
    """One layer's low-rank update ``delta W = (alpha / rank) * up @ down``.

    Args:
        down: ``(rank, in_features)`` for a linear layer, ``(rank, in_channels, kh, kw)`` for a convolution.
        up: ``(out_features, rank)``, or ``(out_channels, rank, 1, 1)``.
        alpha: the scale numerator; ``alpha / rank`` multiplies the update.
    """

    down: Tensor
    up: Tensor
    alpha: float

    def __post_init__(self) -> None:
        rank = self.down.shape[0]
        if rank == 0 or self.up.shape[1] != rank:
            raise ValueError(f"LoRA down {tuple(self.down.shape)} and up {tuple(self.up.shape)} must share a rank above 0")
        if not (torch.isfinite(self.down).all() and torch.isfinite(self.up).all()) or self.alpha != self.alpha:
            raise ValueError("LoRA weights hold NaN or infinite values")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def read_lora_file(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Tensor]:
    """The tensors of a LoRA file: safetensors, or a pickled ``.bin``/``.pt`` only with ``allow_pickle``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    if not allow_pickle:
        raise ValueError(_MSG_PICKLE.format(path=path))
    return torch.load(path, map_location="cpu", weights_only=True)


def detect_layout(state_dict: Mapping[str, Tensor]) -> Layout:
    """``kohya`` when any key starts with ``lora_unet_``, else ``peft``."""
    return "kohya" if any(key.startswith(KOHYA_PREFIX) for key in state_dict) else "peft"


def convert(state_dict: Mapping[str, Tensor], targets: Collection[str], *, model: str) -> dict[str, LoRAWeights]:
    """Read a LoRA state dict of either layout into ``{module path: LoRAWeights}``.

    Args:
        state_dict: the file's tensors.
        targets: the paths of the model's linear and convolution layers.
        model: the model's name, for errors.

    Raises:
        ValueError: keys that name no layer of ``model`` (all of them named), a layer without its
            down or up matrix, a rank of 0, or NaN weights.
    """
    layout = detect_layout(state_dict)
    if layout == "kohya":
        by_flat = {name.replace(".", "_"): name for name in targets}
        prefixes, parts = (KOHYA_PREFIX,), KOHYA_PARTS
    else:
        by_flat = {name: name for name in targets}
        prefixes, parts = PEFT_PREFIXES, PEFT_PARTS
    grouped: dict[str, dict[str, Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        found = _split(key, prefixes, parts)
        if found is None or found[0] not in by_flat:
            unknown.append(key)
            continue
        grouped.setdefault(by_flat[found[0]], {})[found[1]] = tensor
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (", ..." if len(unknown) > 8 else "")
        raise ValueError(_MSG_UNKNOWN.format(count=len(unknown), model=model, layout=layout, keys=shown))
    layers: dict[str, LoRAWeights] = {}
    for name, found in sorted(grouped.items()):
        if "down" not in found or "up" not in found:
            raise ValueError(f"LoRA layer {name!r} lacks its {'down' if 'down' not in found else 'up'} matrix")
        down, up = found["down"].float(), found["up"].float()
        alpha = float(found["alpha"]) if "alpha" in found else float(down.shape[0])
        try:
            layers[name] = LoRAWeights(down, up, alpha)
        except ValueError as error:
            raise ValueError(f"LoRA layer {name!r}: {error}") from None
    return layers


def _split(key: str, prefixes: tuple[str, ...], parts: Mapping[str, str]) -> tuple[str, str] | None:
    """``(module path, part)`` of a key, or None when its prefix or suffix is not in the table."""
    prefix = next((p for p in prefixes if key.startswith(p)), None)
    if prefix is None:
        return None
    for suffix, part in parts.items():
        if key.endswith("." + suffix):
            return key[len(prefix) : -len(suffix) - 1], part
    return None


__all__ = ["LoRAWeights", "Layout", "convert", "detect_layout", "read_lora_file"]
