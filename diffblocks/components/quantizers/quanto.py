"""optimum-quanto: int8, int4, int2 and float8 weights in ``QLinear`` layers (optionally int8/float8 activations).

Each ``nn.Linear`` becomes quanto's ``QLinear`` and is frozen, so its weight is stored quantized.
The saved state dict is plain tensors (``weight._data``, ``weight._scale``, ...), which safetensors
holds directly, in the layout diffusers' ``QuantoConfig`` reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal, final

from pydantic import field_validator
from torch import nn
from typing_extensions import Self

from diffblocks.components.quantizers.base import AbstractQuantizer

QuantoWeights = Literal["int8", "int4", "int2", "float8"]
QuantoActivations = Literal["int8", "float8"]
_QTYPES = {"int8": "qint8", "int4": "qint4", "int2": "qint2", "float8": "qfloat8"}


def _short(value: object) -> object:
    """quanto's ``"qint8"`` spelling (or its qtype object) -> ``"int8"``."""
    name = getattr(value, "name", value)
    return name.removeprefix("q") if isinstance(name, str) and name.startswith("q") else name


@final
class QuantoQuantizer(AbstractQuantizer):
    """Quantize linear weights with optimum-quanto (``pip install optimum-quanto``).

    Args:
        weights: ``"int8"``, ``"int4"``, ``"int2"`` or ``"float8"`` (quanto's ``"qint8"`` spellings too).
        activations: None, ``"int8"`` or ``"float8"``; diffusers' config has no field for
            activations, so a quantizer with them does not save in diffusers' layout.

    Example:
        >>> QuantoQuantizer("qint4").weights
        'int4'
    """

    quant_method: ClassVar[str] = "quanto"
    package: ClassVar[str] = "optimum.quanto"
    install: ClassVar[str] = 'pip install "diffblocks[quant]"  (or: pip install optimum-quanto)'

    weights: QuantoWeights = "int8"
    activations: QuantoActivations | None = None

    def __init__(self, weights: str | None = None, /, **data: Any) -> None:
        if weights is not None:
            data["weights"] = weights
        super().__init__(**data)

    @field_validator("weights", "activations", mode="before")
    @classmethod
    def _canonical(cls, value: object) -> object:
        return _short(value)

    @property
    def runs_in_inference_mode(self) -> bool:
        # quanto's packed int4/int2 matmul is an autograd Function that sets version counters,
        # which inference tensors refuse
        return self.weights not in ("int4", "int2")

    def _qtype(self, name: str) -> Any:
        return getattr(self.require(), _QTYPES[name])

    def _replace(self, model: nn.Module) -> None:
        quanto = self.require()
        weights = self._qtype(self.weights)
        activations = self._qtype(self.activations) if self.activations else None
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and not isinstance(module, quanto.QLinear) and self.converts(name):
                layer = quanto.QLinear.from_module(module, weights=weights, activations=activations)
                layer.freeze()
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, layer)

    def apply(self, model: nn.Module) -> None:
        self._replace(model)

    def prepare_to_load(self, model: nn.Module) -> None:
        self._replace(model)  # on the meta device: the layout only; the saved tensors are assigned after

    def to_diffusers(self) -> dict[str, Any]:
        if self.activations is not None:
            raise ValueError(
                f"{self.describe()} quantizes activations, which diffusers' QuantoConfig cannot record; "
                "save a quantizer without activations, or keep the float weights and quantize after loading."
            )
        return {
            "quant_method": self.quant_method,
            "weights_dtype": self.weights,
            "modules_to_not_convert": list(self.modules_to_not_convert) if self.modules_to_not_convert else None,
        }

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> Self:
        skipped = config.get("modules_to_not_convert")
        return cls(str(config.get("weights_dtype", "int8")), modules_to_not_convert=tuple(skipped) if skipped else None)


__all__ = ["QuantoQuantizer"]
