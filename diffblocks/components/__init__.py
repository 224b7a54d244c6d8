"""Components: models, schedulers, guiders, attention, quantizers, and the manager that loads and shares them."""

from diffblocks.components.config_files import ConfigFileError
from diffblocks.components.containment import RepositoryPathError
from diffblocks.components.hub import resolve_folder
from diffblocks.components.devices import usable_device
from diffblocks.components.manager import ComponentInfo, ComponentsManager
from diffblocks.components.specs import ComponentSpec, PipelineIndex, parse_index, read_index, write_modular_index

__all__ = [
    "ComponentInfo",
    "ComponentSpec",
    "ComponentsManager",
    "ConfigFileError",
    "PipelineIndex",
    "RepositoryPathError",
    "parse_index",
    "read_index",
    "resolve_folder",
    "usable_device",
    "write_modular_index",
]
