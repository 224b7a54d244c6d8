"""Names -> classes, by allowlist: components named by index files, blocks of saved pipelines, pipeline formats,
and the values (guiders, quantizers) a config names by ``_class_name``."""

from diffblocks.registry.allowlist import ConfigAllowlist
from diffblocks.registry.defaults import (
    DIFFUSERS_FORMAT,
    default_block_registry,
    default_component_registry,
    default_format_registry,
)
from diffblocks.registry.registry import Key, Registry, RegistryError, RegistryWarning

COMPONENTS: Registry = default_component_registry()
"""The process-wide component allowlist used by the ComponentsManager."""

BLOCKS: Registry = default_block_registry()
"""The process-wide block allowlist used when loading saved pipelines."""

FORMATS: Registry = default_format_registry()
"""The process-wide pipeline formats: how ``Pipeline.from_pretrained`` and ``save_pretrained`` read and write."""

__all__ = [
    "BLOCKS",
    "COMPONENTS",
    "ConfigAllowlist",
    "DIFFUSERS_FORMAT",
    "FORMATS",
    "Key",
    "Registry",
    "RegistryError",
    "RegistryWarning",
    "default_block_registry",
    "default_component_registry",
    "default_format_registry",
]
