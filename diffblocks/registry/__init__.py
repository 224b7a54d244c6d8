"""Names -> classes, by allowlist: component type hints from index files, and blocks of saved pipelines."""

from diffblocks.registry.defaults import default_block_registry, default_component_registry
from diffblocks.registry.registry import Registry, RegistryError, RegistryWarning

COMPONENTS: Registry = default_component_registry()
"""The process-wide component allowlist used by the ComponentsManager."""

BLOCKS: Registry = default_block_registry()
"""The process-wide block allowlist used when loading saved pipelines."""

__all__ = ["BLOCKS", "COMPONENTS", "Registry", "RegistryError", "RegistryWarning", "default_block_registry", "default_component_registry"]
