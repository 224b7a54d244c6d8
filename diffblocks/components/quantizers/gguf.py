"""GGUF: weights that stay in ggml's quantized blocks in memory and are dequantized per layer when used.

GGUF files come quantized (llama.cpp's tools, city96's Flux conversions); nothing is quantized here.
:func:`diffblocks.components.models.gguf.load_gguf` reads a file into one of our models: every
linear weight stored in a block type becomes a :class:`GGUFLinear` holding the raw bytes, and the
other tensors (norm scales, biases, float-typed weights) are ordinary tensors in the compute dtype.
The ``gguf`` package only parses the container; the dequantization is ours
(:mod:`~diffblocks.components.quantizers.gguf_kernels`).

diffusers cannot save GGUF-quantized models, and neither do we: keep the ``.gguf`` file and load it again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal, final

import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import Tensor, nn
from typing_extensions import Self

from diffblocks.components.quantizers.base import AbstractQuantizer
from diffblocks.components.quantizers.gguf_kernels import BLOCK_TYPES, dequantize

ComputeDtype = Literal["float32", "float16", "bfloat16"]
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_MSG_FROM_FILE = (
    "GGUFQuantizer quantizes nothing itself: GGUF weights come quantized in .gguf files. Load one with "
    "diffblocks.components.models.gguf.load_gguf(path, FluxTransformer2DModel, config=..., "
    "quantizer=GGUFQuantizer(...)) and pass the model "
    "as a component; or quantize float weights with TorchAoQuantizer or QuantoQuantizer."
)
_MSG_NO_SAVE = (
    "{model} holds GGUF weights, which diffblocks (like diffusers) does not save: keep the .gguf file and load it "
    "again with load_gguf, or quantize the float weights with a backend that saves (torchao, quanto)."
)


@final
class GGUFQuantizer(AbstractQuantizer):
    """Read GGUF-quantized weights and compute with them in ``compute_dtype`` (``pip install gguf``).

    Types read: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (kept quantized) and
    F16, BF16, F32 (kept as floats).

    Args:
        compute_dtype: each layer's weight is dequantized to this when it runs, and the model's
            other tensors are held in it (``"bfloat16"`` by default, as diffusers; a
            ``torch.dtype`` is accepted too).
    """

    quant_method: ClassVar[str] = "gguf"
    package: ClassVar[str] = "gguf"
    install: ClassVar[str] = 'pip install "diffblocks[quant]"  (or: pip install gguf)'
    quantizes_float_weights: ClassVar[bool] = False

    compute_dtype: ComputeDtype = "bfloat16"

    def __init__(self, compute_dtype: str | torch.dtype | None = None, /, **data: Any) -> None:
        if compute_dtype is not None:
            data["compute_dtype"] = compute_dtype
        super().__init__(**data)

    @field_validator("compute_dtype", mode="before")
    @classmethod
    def _dtype_name(cls, value: object) -> object:
        if isinstance(value, torch.dtype):
            return str(value).removeprefix("torch.")
        return value.removeprefix("torch.") if isinstance(value, str) else value

    @property
    def dtype(self) -> torch.dtype:
        """``compute_dtype`` as a ``torch.dtype``."""
        return _DTYPES[self.compute_dtype]

    def apply(self, model: nn.Module) -> None:
        raise ValueError(_MSG_FROM_FILE)

    def to_diffusers(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "compute_dtype": self.compute_dtype,
            "pre_quantized": True,
            "modules_to_not_convert": list(self.modules_to_not_convert) if self.modules_to_not_convert else None,
        }

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> Self:
        skipped = config.get("modules_to_not_convert")
        return cls(str(config.get("compute_dtype", "bfloat16")), modules_to_not_convert=tuple(skipped) if skipped else None)

    def state_to_save(self, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
        raise ValueError(_MSG_NO_SAVE.format(model=type(model).__name__))


@final
class GGUFLinear(nn.Module):
    """A linear layer whose weight stays in GGUF blocks (a ``uint8`` buffer) until it runs.

    Args:
        in_features, out_features: the logical weight is ``(out_features, in_features)``.
        type_name: the ggml block type (``"Q4_K"``).
        data: the raw bytes, ``(out_features, bytes per row)``.
        bias: float bias, or None.
        compute_dtype: what the weight is dequantized to, and the output's dtype.
    """

    weight: Tensor

    def __init__(
        self, in_features: int, out_features: int, *, type_name: str, data: Tensor, bias: Tensor | None, compute_dtype: torch.dtype
    ) -> None:
        super().__init__()
        kind = BLOCK_TYPES[type_name]
        if in_features % kind.block_size or tuple(data.shape) != (out_features, in_features // kind.block_size * kind.type_size):
            raise ValueError(
                f"{type_name} data of shape {tuple(data.shape)} does not hold a ({out_features}, {in_features}) weight"
            )
        self.in_features, self.out_features, self.type_name, self.compute_dtype = in_features, out_features, type_name, compute_dtype
        self.register_buffer("weight", data)
        self.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False) if bias is not None else None

    def _apply(self, fn: Any, recurse: bool = True) -> GGUFLinear:
        # ``.half()`` and ``.to(dtype)`` cast the floats (the bias) and leave the uint8 blocks as they are;
        # the compute dtype follows the cast, or the weight would meet a bias and inputs of another dtype
        super()._apply(fn, recurse)
        cast = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        if cast in _DTYPES.values():
            self.compute_dtype = cast
        return self

    def dequantized_weight(self) -> Tensor:
        """The ``(out_features, in_features)`` weight in the compute dtype."""
        return dequantize(self.weight, self.type_name, (self.out_features, self.in_features), self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.dequantized_weight()
        return F.linear(x.to(weight.dtype), weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.type_name}"


__all__ = ["GGUFLinear", "GGUFQuantizer"]
