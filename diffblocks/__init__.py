"""diffblocks: compose diffusion pipelines from small, typed, swappable blocks.

The names users reach for first are here, imported on first use (PEP 562), so ``import diffblocks``
loads neither torch nor any model code until one of them is read.

Example:
    >>> import diffblocks
    >>> from diffblocks.blocks import Pipeline
    >>> diffblocks.Pipeline is Pipeline
    True
    >>> diffblocks.default_device().type in {"cuda", "npu", "xpu", "mps", "cpu"}
    True
"""

from __future__ import annotations

import importlib

from diffblocks._version import __version__

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing (half of this module's import time)
if TYPE_CHECKING:
    from typing import Any

    from diffblocks.blocks import Block, BlockIO, Branch, Loop, Pipeline, Sequence, Switch
    from diffblocks.components import ComponentsManager
    from diffblocks.components.devices import default_device
    from diffblocks.presets import from_pretrained

# name -> the module that defines it; each module is imported when one of its names is first read
_LAZY = {
    "Block": "diffblocks.blocks",
    "BlockIO": "diffblocks.blocks",
    "Branch": "diffblocks.blocks",
    "Loop": "diffblocks.blocks",
    "Pipeline": "diffblocks.blocks",
    "Sequence": "diffblocks.blocks",
    "Switch": "diffblocks.blocks",
    "ComponentsManager": "diffblocks.components",
    "default_device": "diffblocks.components.devices",
    "from_pretrained": "diffblocks.presets",
}

__all__ = [
    "Block",
    "BlockIO",
    "Branch",
    "ComponentsManager",
    "Loop",
    "Pipeline",
    "Sequence",
    "Switch",
    "__version__",
    "default_device",
    "from_pretrained",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffblocks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
