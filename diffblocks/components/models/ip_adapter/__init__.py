"""IP-Adapter for the UNet families and Flux: image projections and decoupled cross-attention (Ye et al. 2023)."""

from diffblocks.components.models.ip_adapter.faceid import FaceIDPlusProjection, FaceIDProjection, FacePerceiverResampler
from diffblocks.components.models.ip_adapter.flux import (
    FluxIPAdapterModel,
    FluxIPAttentionLayer,
    MultiFluxIPAdapterModel,
    expand_flux_scales,
    flux_image_prompt,
    flux_ip_adapters,
)
from diffblocks.components.models.ip_adapter.flux_loading import (
    any_ip_adapter_from_state_dict,
    flux_ip_adapter_from_state_dict,
    is_flux_ip_adapter,
    load_any_ip_adapter_file,
)
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
    "FluxIPAdapterModel",
    "FluxIPAttentionLayer",
    "IPAdapterModel",
    "IPAttentionLayer",
    "ImageProjection",
    "ImageProjector",
    "MLPProjection",
    "MultiFluxIPAdapterModel",
    "MultiIPAdapterModel",
    "PerceiverAttention",
    "Resampler",
    "attention_dims",
    "attention_layers",
    "any_ip_adapter_from_state_dict",
    "cross_attention_extras",
    "cross_attention_layers",
    "expand_flux_scales",
    "expand_scales",
    "flux_image_prompt",
    "flux_ip_adapter_from_state_dict",
    "flux_ip_adapters",
    "ip_adapter_from_state_dict",
    "ip_adapters",
    "is_flux_ip_adapter",
    "load_any_ip_adapter_file",
    "load_ip_adapter_file",
    "read_ip_adapter_file",
]
