"""torchao: int8 and float8 weights (optionally with dynamically quantized activations), int4 weights.

torchao replaces each linear weight by a tensor subclass (``Int8Tensor``, ``Float8Tensor``) whose
matmul dequantizes or runs a low-precision kernel. Saved weights are flattened into plain tensors
plus safetensors metadata by torchao's own helpers, the layout diffusers writes and reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal, final

import torch
from pydantic import field_validator
from torch import Tensor, nn
from typing_extensions import Self

from diffblocks.components.quantizers.base import AbstractQuantizer, UnsupportedQuantizationError

TorchAoType = Literal["int8wo", "int8dq", "int4wo", "float8wo", "float8dq"]

# Every spelling people use for a type -> our short name (diffusers' short names are the canonical ones).
_ALIASES: dict[str, TorchAoType] = {
    "int8wo": "int8wo",
    "int8_weight_only": "int8wo",
    "Int8WeightOnlyConfig": "int8wo",
    "int8dq": "int8dq",
    "int8_dynamic_activation_int8_weight": "int8dq",
    "Int8DynamicActivationInt8WeightConfig": "int8dq",
    "int4wo": "int4wo",
    "int4_weight_only": "int4wo",
    "Int4WeightOnlyConfig": "int4wo",
    "float8wo": "float8wo",
    "float8_weight_only": "float8wo",
    "Float8WeightOnlyConfig": "float8wo",
    "float8dq": "float8dq",
    "float8dq_e4m3_row": "float8dq",
    "float8_dynamic_activation_float8_weight": "float8dq",
    "Float8DynamicActivationFloat8WeightConfig": "float8dq",
}
_CONFIG_CLASS: dict[TorchAoType, str] = {
    "int8wo": "Int8WeightOnlyConfig",
    "int8dq": "Int8DynamicActivationInt8WeightConfig",
    "int4wo": "Int4WeightOnlyConfig",
    "float8wo": "Float8WeightOnlyConfig",
    "float8dq": "Float8DynamicActivationFloat8WeightConfig",
}
_MSG_DEVICE = (
    "TorchAoQuantizer({quant_type!r}) cannot run on {device}: {why}. Use int8wo, int8dq or float8wo there, "
    "or load onto a device that supports it."
)


def _cuda_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


@final
class TorchAoQuantizer(AbstractQuantizer):
    """Quantize linear weights with torchao (``pip install torchao``).

    Args:
        quant_type: ``"int8wo"`` (int8 weights), ``"int8dq"`` (int8 weights and dynamically
            quantized int8 activations), ``"int4wo"`` (int4 weights, groups of 128; CUDA),
            ``"float8wo"`` (float8 e4m3 weights), ``"float8dq"`` (float8 weights and activations,
            row-wise scales; CUDA compute capability 8.9+). torchao's long names
            (``"int8_weight_only"``) and config class names are accepted.

    Example:
        >>> TorchAoQuantizer("int8_weight_only").quant_type
        'int8wo'
    """

    quant_method: ClassVar[str] = "torchao"
    package: ClassVar[str] = "torchao"
    install: ClassVar[str] = 'pip install "diffblocks[quant]"  (or: pip install torchao)'

    quant_type: TorchAoType

    def __init__(self, quant_type: str | None = None, /, **data: Any) -> None:
        if quant_type is not None:
            data["quant_type"] = quant_type
        super().__init__(**data)

    @field_validator("quant_type", mode="before")
    @classmethod
    def _canonical(cls, value: object) -> object:
        if isinstance(value, str) and value not in _ALIASES:
            raise ValueError(f"unknown torchao quant type {value!r}; known: {', '.join(sorted(_ALIASES))}")
        return _ALIASES[value] if isinstance(value, str) else value

    def check_device(self, device: torch.device) -> None:
        why = ""
        if self.quant_type == "int4wo" and device.type != "cuda":
            why = "torchao's int4 weight-only kernels need a CUDA GPU"
        elif self.quant_type == "float8dq":
            capability = _cuda_capability(device)
            if capability is None or capability < (8, 9):
                found = f"compute capability {capability[0]}.{capability[1]}" if capability else device.type
                why = f"float8 matmuls need CUDA compute capability 8.9 or newer (Ada, Hopper), not {found}"
        if why:
            raise UnsupportedQuantizationError(_MSG_DEVICE.format(quant_type=self.quant_type, device=device, why=why))

    def torchao_config(self) -> Any:
        """The torchao config object (``Int8WeightOnlyConfig()``, ...) this quantizer applies."""
        quantization = self.require().quantization
        cls = getattr(quantization, _CONFIG_CLASS[self.quant_type])
        if self.quant_type == "float8dq":
            return cls(granularity=quantization.PerRow())
        if self.quant_type == "int4wo":
            return cls(group_size=128)
        return cls()

    def apply(self, model: nn.Module) -> None:
        quantize_ = self.require().quantization.quantize_

        def chosen(module: nn.Module, name: str) -> bool:
            return isinstance(module, nn.Linear) and self.converts(name)

        quantize_(model, self.torchao_config(), filter_fn=chosen)

    def to_diffusers(self) -> dict[str, Any]:
        from torchao.core.config import config_to_dict

        return {
            "quant_method": self.quant_method,
            "quant_type": {"default": config_to_dict(self.torchao_config())},
            "modules_to_not_convert": list(self.modules_to_not_convert) if self.modules_to_not_convert else None,
        }

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> Self:
        quant_type = config.get("quant_type")
        if isinstance(quant_type, Mapping):  # {"default": {"_type": "Int8WeightOnlyConfig", ...}}
            default = quant_type.get("default", next(iter(quant_type.values()), None))
            quant_type = default.get("_type") if isinstance(default, Mapping) else None
        if not isinstance(quant_type, str):
            raise ValueError(f"a torchao quantization_config without a readable quant_type: {dict(config)!r}")
        skipped = config.get("modules_to_not_convert")
        return cls(quant_type, modules_to_not_convert=tuple(skipped) if skipped else None)

    def state_to_save(self, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        tensors, metadata = flatten_tensor_state_dict(dict(model.state_dict()))
        return tensors, metadata

    def state_to_load(self, tensors: dict[str, Tensor], metadata: Mapping[str, str]) -> dict[str, Tensor]:
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        if "tensor_names" not in metadata:
            raise ValueError(
                "these torchao weights carry no torchao metadata (saved pickled, by an older torchao?); "
                "re-save them with torchao >= 0.16 and diffusers, or quantize the float weights instead"
            )
        state, left = unflatten_tensor_state_dict(tensors, dict(metadata))
        if left:
            raise ValueError(f"torchao weights missing parts of: {', '.join(sorted(left))[:400]}")
        return state


__all__ = ["TorchAoQuantizer", "TorchAoType"]
