"""LoRA adapters for the UNet, the Flux transformer and the text encoders: read, attached, weighted, fused and removed by value."""

from diffblocks.components.lora.adapter import (
    LoRA,
    LoRALayer,
    adapter_names,
    check_injectable,
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
from diffblocks.components.lora.text_encoders import TEXT_ENCODER_PREFIXES, split_by_model

__all__ = [
    "LoRA",
    "LoRALayer",
    "LoRAWeights",
    "TEXT_ENCODER_PREFIXES",
    "adapter_names",
    "check_injectable",
    "convert",
    "eject",
    "fuse",
    "hotswap",
    "inject",
    "layer_names",
    "read_lora_file",
    "set_weights",
    "split_by_model",
    "Target",
    "targets",
    "unfuse",
]
