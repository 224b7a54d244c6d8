"""Compiled models as components: ``torch.compile(model)`` is checked, shared and saved as ``model``.

``torch.compile`` returns an ``OptimizedModule`` that forwards calls and attributes to the model but
is not an instance of the model's class, and whose state dict prefixes every key with ``_orig_mod.``.
The components manager (and so the plan's component check) and saving look through it.
"""

from __future__ import annotations

import sys
from typing import Any


def unwrap_compiled(component: Any) -> Any:
    """The model inside a ``torch.compile`` wrapper (``OptimizedModule._orig_mod``); anything else unchanged.

    Example:
        >>> import torch
        >>> linear = torch.nn.Linear(2, 2)
        >>> unwrap_compiled(torch.compile(linear, backend="eager")) is linear, unwrap_compiled(linear) is linear
        (True, True)
    """
    # A compiled module exists only once dynamo is imported; importing it here would cost seconds.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    while eval_frame is not None and isinstance(component, eval_frame.OptimizedModule):
        component = component._orig_mod
    return component


__all__ = ["unwrap_compiled"]
