"""Tensor field types for block inputs and outputs: shapes and dtype kinds, checked cheaply.

``Float["batch channels height width"]`` is a ``torch.Tensor`` annotation. Inside a pipeline it costs
one ``isinstance`` when a block builds its outputs; its rank and dtype kind are checked where values
enter the pipeline (the call's inputs, once per call) and compared between producer and consumer
when the pipeline is built. It renders in JSON Schema and docs with its axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

_DTYPE_KINDS = ("any", "float", "int", "bool")


@dataclass(frozen=True)
class TensorSpec:
    """Axes and dtype kind of a tensor field. ``...`` in the axes allows any number of leading axes."""

    axes: tuple[str, ...]
    kind: str = "any"

    @property
    def variadic(self) -> bool:
        return "..." in self.axes

    @property
    def rank(self) -> int | None:
        return None if self.variadic else len(self.axes)

    def describe(self) -> str:
        prefix = "" if self.kind == "any" else f"{self.kind} "
        return f"{prefix}Tensor[{' '.join(self.axes)}]"

    def accepts(self, other: TensorSpec) -> bool:
        """Whether a tensor declared as ``other`` always satisfies this spec."""
        kind_ok = self.kind == "any" or self.kind == other.kind
        rank_ok = self.rank is None or other.rank is None or self.rank == other.rank
        return kind_ok and rank_ok

    def check(self, value: torch.Tensor) -> torch.Tensor:
        rank = self.rank
        if rank is not None and value.ndim != rank:
            raise PydanticCustomError(
                "tensor_rank",
                "expected a {rank}-d tensor [{axes}], got shape {shape}",
                {"rank": rank, "axes": " ".join(self.axes), "shape": tuple(value.shape)},
            )
        if self.kind != "any" and _kind_of(value) != self.kind:
            raise PydanticCustomError(
                "tensor_dtype", "expected a {kind} tensor, got dtype {dtype}", {"kind": self.kind, "dtype": str(value.dtype)}
            )
        if self.kind == "float" and not bool(torch.isfinite(value).all()):
            # one NaN or infinity spreads through every step into every pixel; refuse it where it enters
            bad = int((~torch.isfinite(value)).sum())
            raise PydanticCustomError(
                "tensor_finite", "holds {bad} NaN or infinite values of {total}; give finite values", {"bad": bad, "total": value.numel()}
            )
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.is_instance_schema(torch.Tensor)

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {"type": "object", "format": "tensor", "x-axes": list(self.axes), "x-dtype": self.kind}


def _kind_of(value: torch.Tensor) -> str:
    if value.dtype == torch.bool:
        return "bool"
    if value.is_complex():
        return "complex"  # not a float: latents and images are real, and a complex tensor would pass silently
    return "float" if value.is_floating_point() else "int"


class _TensorAnnotation:
    """``Kind["axes"]`` builds ``Annotated[torch.Tensor, TensorSpec(...)]``."""

    def __init__(self, kind: str) -> None:
        assert kind in _DTYPE_KINDS
        self.kind = kind

    def __getitem__(self, axes: str) -> Any:
        return Annotated[torch.Tensor, TensorSpec(tuple(axes.split()), self.kind)]


Float = _TensorAnnotation("float")
Int = _TensorAnnotation("int")
Bool = _TensorAnnotation("bool")
Shaped = _TensorAnnotation("any")
