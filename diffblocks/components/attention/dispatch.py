"""Attention dispatch: one function, backends chosen behind it."""

from __future__ import annotations

from torch import Tensor
from torch.compiler import is_dynamo_compiling

from diffblocks.components.attention._state import ACTIVE, COMPILE_MIRROR, Kernel
from diffblocks.components.attention.checks import MASK_WITH_CAUSAL, CheckedAttentionBackend
from diffblocks.components.attention.errors import ATTENTION_ERRORS, AttentionInputError, UnsupportedAttentionError


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
) -> Tensor:
    """Scaled dot-product attention over ``(batch, heads, seq, head_dim)`` tensors (Vaswani et al., 2017).

    Runs on the backend selected by ``attention_backend(...)``, ``set_attention_backend(model, ...)``
    or ``DIFFBLOCKS_ATTENTION_BACKEND``, in that precedence; ``"sdpa"`` by default.

    Args:
        q: queries, ``(batch, heads, seq_q, head_dim)``.
        k: keys, ``(batch, heads, seq_k, head_dim)``.
        v: values, ``(batch, heads, seq_k, head_dim_v)``.
        mask: optional boolean (True = attend) or additive float mask broadcastable to
            ``(batch, heads, seq_q, seq_k)``; not together with ``is_causal``.
        scale: softmax scale; ``head_dim ** -0.5`` when None.
        is_causal: apply a causal mask aligned top-left (query ``i`` sees keys ``0..i``).

    Returns:
        ``(batch, heads, seq_q, head_dim_v)``.

    Example:
        >>> import torch
        >>> q = k = v = torch.randn(1, 2, 4, 8)
        >>> attention(q, k, v).shape
        torch.Size([1, 2, 4, 8])
    """
    if is_dynamo_compiling():
        # ContextVar.get would break the graph; the mirror is a plain global dynamo can guard on
        kernel = COMPILE_MIRROR[0]
        if is_causal and mask is not None:
            _refuse_mask_with_causal(kernel)
        return kernel.forward(q, k, v, mask=mask, scale=scale, is_causal=is_causal)
    kernel = ACTIVE.get()
    if is_causal and mask is not None:  # checked inline: a function call per attention layer is not free
        _refuse_mask_with_causal(kernel)
    try:
        return kernel.forward(q, k, v, mask=mask, scale=scale, is_causal=is_causal)
    except ATTENTION_ERRORS:
        raise
    except Exception as error:
        explained = _explain_failure(kernel, error, q, k, v, mask=mask, is_causal=is_causal)
        if explained is None:
            raise
        raise explained from error


def _refuse_mask_with_causal(kernel: Kernel) -> None:
    """Backends disagree on a mask together with ``is_causal`` (some apply both, some only the mask).

    Checks mode reports it among the call's other problems; otherwise it is refused here, alone.
    """
    if not isinstance(kernel, CheckedAttentionBackend):
        raise AttentionInputError(backend=kernel.name, reasons=[MASK_WITH_CAUSAL])


def _explain_failure(
    kernel: Kernel, error: Exception, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, is_causal: bool
) -> UnsupportedAttentionError | None:
    """Restate a kernel's failure as the declared-support reasons it violated, if any.

    Costs nothing on success: support is only consulted once a kernel has already failed.
    """
    backend = kernel.backend if isinstance(kernel, CheckedAttentionBackend) else kernel
    try:
        reasons = backend.unsupported_reasons(q, k, v, mask=mask, is_causal=is_causal)
    except Exception:  # inputs too malformed to describe; the kernel's own error is the better one
        return None
    if not reasons:
        return None
    first_line = next(iter(str(error).strip().splitlines()), "")
    reasons.append(f"the kernel raised {type(error).__name__}: {first_line}")
    return UnsupportedAttentionError(backend=backend.name, reasons=reasons)


__all__ = ["attention"]
