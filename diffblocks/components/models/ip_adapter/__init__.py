"""IP-Adapter for the UNet families: image projections and decoupled cross-attention (Ye et al. 2023)."""

from diffblocks.components.models.ip_adapter.faceid import FaceIDPlusProjection, FaceIDProjection, FacePerceiverResampler
from diffblocks.components.models.ip_adapter.loading import ip_adapter_from_state_dict, load_ip_adapter_file, read_ip_adapter_file
from diffblocks.components.models.ip_adapter.model import (
    IPAdapterModel,
    IPAttentionLayer,
    MultiIPAdapterModel,
    attention_dims,
    attention_layers,
    cross_attention_extras,
    cross_attention_layers,
    ip_adapters,
)
from diffblocks.components.models.ip_adapter.lora import AttentionDims
from diffblocks.components.models.ip_adapter.projection import ImageProjection, ImageProjector, MLPProjection, PerceiverAttention, Resampler
from diffblocks.components.models.ip_adapter.scales import expand_scales

__all__ = [
    "AttentionDims",
    "FaceIDPlusProjection",
    "FaceIDProjection",
    "FacePerceiverResampler",
    "IPAdapterModel",
    "IPAttentionLayer",
    "ImageProjection",
    "ImageProjector",
    "MLPProjection",
    "MultiIPAdapterModel",
    "PerceiverAttention",
    "Resampler",
    "attention_dims",
    "attention_layers",
    "cross_attention_extras",
    "cross_attention_layers",
    "expand_scales",
    "ip_adapter_from_state_dict",
    "ip_adapters",
    "load_ip_adapter_file",
    "read_ip_adapter_file",
]
