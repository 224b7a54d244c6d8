"""LoRA adapters for the UNet and the Flux transformer: read, attached, weighted, fused and removed by value."""

from diffblocks.components.lora.adapter import (
    LoRA,
    LoRALayer,
    adapter_names,
    eject,
    fuse,
    hotswap,
    inject,
    set_weights,
    targets,
    unfuse,
)
from diffblocks.components.lora.formats import LoRAWeights, convert, read_lora_file
from diffblocks.components.lora.names import Target, layer_names

__all__ = [
    "LoRA",
    "LoRALayer",
    "LoRAWeights",
    "adapter_names",
    "convert",
    "eject",
    "fuse",
    "hotswap",
    "inject",
    "layer_names",
    "read_lora_file",
    "set_weights",
    "Target",
    "targets",
    "unfuse",
]
