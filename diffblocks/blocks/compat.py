"""Static compatibility of declared field types, used once when a pipeline is built."""

from __future__ import annotations

import collections.abc
import types
import typing
from typing import Annotated, Any, Literal, Union

from diffblocks.blocks.types import TensorSpec

_UNION_TYPES: tuple[Any, ...] = (Union, types.UnionType)


def _split_annotated(tp: Any) -> tuple[Any, TensorSpec | None]:
    if typing.get_origin(tp) is Annotated:
        base, *meta = typing.get_args(tp)
        spec = next((m for m in meta if isinstance(m, TensorSpec)), None)
        return base, spec
    return tp, None


def _members(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) in _UNION_TYPES else (tp,)


def is_compatible(produced: Any, required: Any) -> bool:
    """Whether every value of type ``produced`` is acceptable where ``required`` is declared."""
    if required is Any or required is object or produced == required:
        return True
    if produced is Any:
        return True  # undeclared producers are trusted; the consumer validates nothing per step
    if typing.get_origin(produced) in _UNION_TYPES:
        return all(is_compatible(member, required) for member in _members(produced))
    if typing.get_origin(required) in _UNION_TYPES:
        return any(is_compatible(produced, member) for member in _members(required))
    produced_base, produced_spec = _split_annotated(produced)
    required_base, required_spec = _split_annotated(required)
    if produced_spec is not None or required_spec is not None:
        if not is_compatible(produced_base, required_base):
            return False
        return required_spec is None or produced_spec is None or required_spec.accepts(produced_spec)
    return _compatible_plain(produced, required)


def _compatible_plain(produced: Any, required: Any) -> bool:
    produced_origin, required_origin = typing.get_origin(produced), typing.get_origin(required)
    if produced_origin is Literal:
        if required_origin is Literal:
            return set(typing.get_args(produced)) <= set(typing.get_args(required))
        return all(is_compatible(type(value), required) for value in typing.get_args(produced))
    if required_origin is Literal:
        return False
    if required_origin is None and produced_origin is None:
        if isinstance(produced, type) and isinstance(required, type):
            return issubclass(produced, required) or (required is float and produced is int)
        return False
    produced_cls = produced_origin or produced
    required_cls = required_origin or required
    if not (isinstance(produced_cls, type) and isinstance(required_cls, type)):
        return False
    if not issubclass(produced_cls, required_cls):
        return False
    required_args, produced_args = typing.get_args(required), typing.get_args(produced)
    if not required_args or not produced_args:
        return True
    if required_cls is tuple or produced_cls is tuple or issubclass(required_cls, collections.abc.Mapping):
        if len(required_args) != len(produced_args):
            return Ellipsis in required_args or Ellipsis in produced_args
    return all(
        a is Ellipsis or b is Ellipsis or is_compatible(a, b) for a, b in zip(produced_args, required_args, strict=False)
    )


def describe_type(tp: Any) -> str:
    """A short human-readable name for a declared type (``Float[Tensor[b c h w]]``, ``int | None``)."""
    base, spec = _split_annotated(tp)
    if spec is not None:
        return spec.describe()
    if base is not tp:
        return describe_type(base)
    if typing.get_origin(tp) in _UNION_TYPES:
        return " | ".join(describe_type(member) for member in _members(tp))
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("torch.", "")
