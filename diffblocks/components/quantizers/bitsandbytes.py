"""bitsandbytes: nf4 and fp4 weights (``Linear4bit``) and LLM.int8 weights (``Linear8bitLt``).

bitsandbytes quantizes when a weight is moved to its device, so each ``nn.Linear`` is replaced by
the bitsandbytes layer holding the float weight and moved where the model is. Its CPU backend
runs nf4, fp4 and int8 (bitsandbytes >= 0.45); CUDA runs everything. Saved 4-bit weights are the
packed bytes plus their quantization state (``weight.absmax``, ``weight.quant_map``,
``weight.quant_state.bitsandbytes__nf4``), as diffusers and transformers write them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal, final

import torch
from pydantic import field_validator
from torch import Tensor, nn
from typing_extensions import Self

from diffblocks.components.quantizers.base import AbstractQuantizer, UnsupportedQuantizationError, check_unexpected

BnbType = Literal["nf4", "fp4", "int8"]
BnbDtype = Literal["float32", "float16", "bfloat16"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DEVICES = frozenset({"cpu", "cuda"})


def _portable(layer: nn.Module) -> nn.Module:
    """Keep a 4-bit layer in bitsandbytes' portable layout on the CPU.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight and rewrites its block scales in
    place on the first forward; its inverse is approximate, so a model saved after a run would not
    be the model that was quantized. The portable path computes the same product.
    """
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False
    return layer


@final
class BitsAndBytesQuantizer(AbstractQuantizer):
    """Quantize linear weights with bitsandbytes (``pip install bitsandbytes``).

    Args:
        quant_type: ``"nf4"``, ``"fp4"`` (4-bit, blocks of 64) or ``"int8"`` (LLM.int8).
        compute_dtype: the dtype 4-bit layers dequantize to and compute in.
        double_quant: also quantize the 4-bit blocks' scales (saves about 0.4 bits per weight).
    """

    quant_method: ClassVar[str] = "bitsandbytes"
    package: ClassVar[str] = "bitsandbytes"
    install: ClassVar[str] = "pip install bitsandbytes"

    quant_type: BnbType = "nf4"
    compute_dtype: BnbDtype = "float32"
    double_quant: bool = False

    def __init__(self, quant_type: str | None = None, /, **data: Any) -> None:
        if quant_type is not None:
            data["quant_type"] = quant_type
        super().__init__(**data)

    @field_validator("compute_dtype", mode="before")
    @classmethod
    def _dtype_name(cls, value: object) -> object:
        return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value

    def check_device(self, device: torch.device) -> None:
        if device.type not in _DEVICES:
            raise UnsupportedQuantizationError(
                f"{self.describe()} cannot run on {device}: bitsandbytes runs on CUDA GPUs and (nf4, fp4, int8) "
                "on the CPU. Load onto one of those, or use TorchAoQuantizer or QuantoQuantizer."
            )

    def _layer(self, module: nn.Linear, bnb: Any) -> nn.Module:
        device = module.weight.device
        weight = module.weight.data
        if self.quant_type == "int8":
            layer = bnb.nn.Linear8bitLt(
                module.in_features, module.out_features, bias=module.bias is not None, has_fp16_weights=False, device="meta"
            )
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=_DTYPES[self.compute_dtype],
                compress_statistics=self.double_quant,
                quant_type=self.quant_type,
                device="meta",
            )
            layer.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, quant_type=self.quant_type, compress_statistics=self.double_quant
            )
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data, requires_grad=False)
        return _portable(layer.to(device))  # bitsandbytes quantizes here

    def apply(self, model: nn.Module) -> None:
        bnb = self.require()
        for name, module in list(model.named_modules()):
            if type(module) is nn.Linear and self.converts(name):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, self._layer(module, bnb))

    def to_diffusers(self) -> dict[str, Any]:
        four = self.quant_type != "int8"
        return {
            "quant_method": self.quant_method,
            "_load_in_4bit": four,
            "_load_in_8bit": not four,
            "load_in_4bit": four,
            "load_in_8bit": not four,
            "llm_int8_threshold": 6.0,
            "llm_int8_skip_modules": list(self.modules_to_not_convert) if self.modules_to_not_convert else None,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "bnb_4bit_quant_type": self.quant_type if four else "fp4",
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": self.compute_dtype,
            "bnb_4bit_quant_storage": "uint8",
        }

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> Self:
        four = bool(config.get("load_in_4bit", config.get("_load_in_4bit", False)))
        skipped = config.get("llm_int8_skip_modules")
        return cls(
            str(config.get("bnb_4bit_quant_type", "nf4")) if four else "int8",
            compute_dtype=str(config.get("bnb_4bit_compute_dtype") or "float32"),
            double_quant=bool(config.get("bnb_4bit_use_double_quant", False)),
            modules_to_not_convert=tuple(skipped) if skipped else None,
        )

    def load_state(self, model: nn.Module, tensors: dict[str, Tensor], metadata: Mapping[str, str], device: torch.device) -> None:
        """Rebuild bitsandbytes layers from saved bytes and quantization state, then assign the rest."""
        bnb = self.require()
        state = dict(tensors)
        for name, module in list(model.named_modules()):
            key = f"{name}.weight"
            if type(module) is not nn.Linear or key not in state or not self.converts(name):
                continue
            stats = {k.removeprefix(key + "."): state.pop(k) for k in [k for k in state if k.startswith(key + ".")]}
            data = state.pop(key).to(device)
            bias = state.pop(f"{name}.bias", None)
            if self.quant_type == "int8":
                layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=bias is not None, has_fp16_weights=False, device="meta")
                state.pop(f"{name}.weight_format", None)
                weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
                weight.CB, weight.SCB = data, state.pop(f"{name}.SCB").to(device)  # the int8 rows and their scales
                layer.weight = weight
            else:
                layer = bnb.nn.Linear4bit(
                    module.in_features, module.out_features, bias=bias is not None,
                    compute_dtype=_DTYPES[self.compute_dtype], quant_type=self.quant_type, device="meta",
                )
                layer.weight = bnb.nn.Params4bit.from_prequantized(
                    data=data, quantized_stats={k: v.to(device) for k, v in stats.items()}, requires_grad=False, device=device
                )
            if bias is not None:
                layer.bias = nn.Parameter(bias.to(device), requires_grad=False)
            layer = _portable(layer)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
        result = model.load_state_dict(state, strict=False, assign=True)
        check_unexpected(model, result.unexpected_keys, self)


__all__ = ["BitsAndBytesQuantizer"]
