"""The one attention seam every model calls.

Backends (SDPA sub-kernels, flex, flash-attn, SageAttention, xFormers) plug in behind
:func:`attention`; models never call a kernel directly.
"""

from diffblocks.components.attention.dispatch import attention

__all__ = ["attention"]
