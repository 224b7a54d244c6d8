"""LoRA adapters for the UNet and the Flux transformer: read, attached, weighted, fused and removed by value."""

from diffblocks.components.lora.adapter import LoRA, LoRALayer, adapter_names, eject, fuse, inject, set_weights, unfuse
from diffblocks.components.lora.formats import LoRAWeights, convert, detect_layout, read_lora_file

__all__ = [
    "LoRA",
    "LoRALayer",
    "LoRAWeights",
    "adapter_names",
    "convert",
    "detect_layout",
    "eject",
    "fuse",
    "inject",
    "read_lora_file",
    "set_weights",
    "unfuse",
]
