"""LoRA adapters for the UNet, the Flux transformer and the text encoders: read, attached, weighted, fused and removed by value, their files pinned."""

from diffblocks.components.lora.adapter import (
    LoRA,
    LoRALayer,
    adapter_names,
    adapter_weights,
    check_injectable,
    detached,
    eject,
    fuse,
    hotswap,
    inject,
    is_fused,
    set_weights,
    source_of,
    targets,
    unfuse,
)
from diffblocks.components.lora.formats import LoRAWeights, convert, read_lora_file
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
    "set_weights",
    "source_of",
    "split_by_model",
    "Target",
    "targets",
    "unfuse",
]
