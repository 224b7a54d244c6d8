"""Field markers a block's ``Inputs`` use to say more than a type: where a value comes from."""

from __future__ import annotations

from typing import Any, Final

from pydantic import Field
from pydantic.fields import FieldInfo


class Produced:
    """The marker :func:`produced` puts in a field's metadata."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "produced()"


PRODUCED: Final = Produced()


def produced(*, description: str | None = None) -> Any:
    """Declare an input that an earlier block produces (a schedule, a prediction, prompt embeddings).

    Building a pipeline fails when no block before this one produces it, naming both fixes: add a
    block that produces it, or build the pipeline with ``user_inputs=(name,)`` so callers pass it.
    Undeclared inputs that nothing produces simply become inputs of the pipeline.

    Example:
        >>> from diffblocks.blocks import BlockIO, produced
        >>> class Inputs(BlockIO):
        ...     noise_pred: float = produced(description="the model's prediction")
        >>> is_produced(Inputs.model_fields["noise_pred"])
        True
    """
    info: FieldInfo = Field(description=description)
    info.metadata.append(PRODUCED)  # pydantic keeps unknown metadata on the field and ignores it when validating
    return info


def is_produced(info: FieldInfo) -> bool:
    """Whether a field was declared with :func:`produced`."""
    return any(isinstance(m, Produced) for m in info.metadata)
