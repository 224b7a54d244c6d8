"""FlashAttention 2 (package ``flash_attn``) and 3 (``flash_attn_interface``), imported on demand."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, final

from torch import Tensor

from diffblocks.components.attention.base import AbstractAttentionBackend
from diffblocks.components.attention.registry import AttentionBackendName, register_attention_backend
from diffblocks.components.attention.support import CausalSupport, DeviceSupport, HALF_DTYPES, PackageRequirement

FlashKernel = Callable[..., "Tensor | tuple[Tensor, ...]"]


class AbstractFlashAttnBackend(AbstractAttentionBackend):
    """A flash-attn ``flash_attn_func`` over ``(batch, seq, heads, head_dim)``.

    flash-attn takes no mask and aligns its causal mask bottom-right; both would silently change
    the result, so they are refused here with one cheap check rather than only in checks mode.
    """

    function_name: ClassVar[str] = "flash_attn_func"

    def __init__(self) -> None:
        self._function: FlashKernel | None = None

    def _load(self) -> FlashKernel:
        assert self.requirement is not None, "flash-attn backends always name their package"
        module = self.requirement.load(backend=self.name)
        function: FlashKernel = getattr(module, self.function_name)
        self._function = function
        return function

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float | None, is_causal: bool
    ) -> Tensor:
        if mask is not None or (is_causal and q.shape[-2] != k.shape[-2]):
            raise self.refusal(q, k, v, mask=mask, is_causal=is_causal)
        function = self._function or self._load()
        # (b, h, s, d) -> (b, s, h, d) is a view: flash-attn only needs the last dim contiguous
        out = function(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=is_causal)
        if isinstance(out, tuple):  # some flash-attn 3 builds also return the log-sum-exp
            out = out[0]
        return out.transpose(1, 2)


def _flash_support(*, min_capability: tuple[int, int]) -> dict[str, DeviceSupport]:
    return {
        "cuda": DeviceSupport(
            dtypes=HALF_DTYPES,
            bool_mask=False,
            additive_mask=False,
            causal=CausalSupport.EQUAL_LENGTHS,
            max_head_dim=256,
            distinct_value_head_dim=False,
            min_cuda_capability=min_capability,
        )
    }


@final
@register_attention_backend
class FlashAttn2Backend(AbstractFlashAttnBackend):
    """FlashAttention-2 (Dao, 2023) from the ``flash-attn`` package; Ampere or newer."""

    name = AttentionBackendName.FLASH_ATTN_2.value
    requirement = PackageRequirement(module="flash_attn", package="flash-attn", install="pip install flash-attn")
    support = _flash_support(min_capability=(8, 0))


@final
@register_attention_backend
class FlashAttn3Backend(AbstractFlashAttnBackend):
    """FlashAttention-3 (Shah et al., 2024) from flash-attention's ``hopper/`` build; Hopper GPUs."""

    name = AttentionBackendName.FLASH_ATTN_3.value
    requirement = PackageRequirement(
        module="flash_attn_interface",
        package="flash-attn-3 (flash_attn_interface)",
        install="build it from the hopper/ folder of github.com/Dao-AILab/flash-attention (python setup.py install)",
    )
    support = _flash_support(min_capability=(9, 0))


__all__ = ["AbstractFlashAttnBackend", "FlashAttn2Backend", "FlashAttn3Backend"]
