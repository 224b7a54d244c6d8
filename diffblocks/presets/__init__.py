"""Ready pipelines per model family, loaded from diffusers-layout repositories.

Names are imported on first use, so ``diffblocks.presets.tiny.world`` (numpy only) stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FAMILIES", "Family", "family_of", "from_pretrained", "register_family"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from diffblocks.presets import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'diffblocks.presets' has no attribute {name!r}")
