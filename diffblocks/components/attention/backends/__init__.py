"""Built-in attention backends; importing this package registers each of them."""

from diffblocks.components.attention.backends.auto import AutoBackend
from diffblocks.components.attention.backends.flash_attn import (
    AbstractFlashAttnBackend,
    FlashAttn2Backend,
    FlashAttn3Backend,
)
from diffblocks.components.attention.backends.flex import FlexAttentionBackend
from diffblocks.components.attention.backends.reference import ReferenceBackend
from diffblocks.components.attention.backends.sage import SageAttentionBackend
from diffblocks.components.attention.backends.sdpa import (
    AbstractForcedSdpaBackend,
    SdpaBackend,
    SdpaCudnnBackend,
    SdpaEfficientBackend,
    SdpaFlashBackend,
    SdpaMathBackend,
)
from diffblocks.components.attention.backends.xformers import XformersBackend

__all__ = [
    "AbstractFlashAttnBackend",
    "AbstractForcedSdpaBackend",
    "AutoBackend",
    "FlashAttn2Backend",
    "FlashAttn3Backend",
    "FlexAttentionBackend",
    "ReferenceBackend",
    "SageAttentionBackend",
    "SdpaBackend",
    "SdpaCudnnBackend",
    "SdpaEfficientBackend",
    "SdpaFlashBackend",
    "SdpaMathBackend",
    "XformersBackend",
]
