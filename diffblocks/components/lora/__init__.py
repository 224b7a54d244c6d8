"""LoRA adapters for the UNet, the Flux transformer and the text encoders: read, attached, weighted, fused and removed by value, their files pinned."""

from diffblocks.components.lora.adapter import LoRA, check_hotswappable, check_injectable, eject, hotswap, inject
from diffblocks.components.lora.attached import (
    adapter_names,
    adapter_weights,
    detached,
    fuse,
    is_fused,
    set_enabled,
    set_weights,
    source_of,
    unfuse,
)
from diffblocks.components.lora.formats import LoRAWeights, convert, read_lora_file
from diffblocks.components.lora.layer import LoRALayer, targets
from diffblocks.components.lora.names import Target, layer_names
from diffblocks.components.lora.sources import LoRASource, resolve_lora_file
from diffblocks.components.lora.text_encoders import TEXT_ENCODER_PREFIXES, split_by_model

__all__ = [
    "LoRA",
    "LoRALayer",
    "LoRASource",
    "LoRAWeights",
    "TEXT_ENCODER_PREFIXES",
    "adapter_names",
    "adapter_weights",
    "check_hotswappable",
    "check_injectable",
    "detached",
    "convert",
    "eject",
    "fuse",
    "hotswap",
    "inject",
    "is_fused",
    "layer_names",
    "read_lora_file",
    "resolve_lora_file",
    "set_enabled",
    "set_weights",
    "source_of",
    "split_by_model",
    "Target",
    "targets",
    "unfuse",
]
