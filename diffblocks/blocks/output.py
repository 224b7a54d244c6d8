"""What a pipeline call returns."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


class PipelineOutput(Mapping[str, Any]):
    """Every value the call produced, by name (``out.images``, ``out["latents"]``), plus run facts.

    Attributes:
        workflow: the workflow that ran (``"text2img"``, ``"img2img"``, ...).
        timings: seconds per block path when the call asked for ``timings=True``.
        interrupted: whether a callback stopped the loop early.
    """

    def __init__(
        self, values: dict[str, Any], *, workflow: str, timings: dict[str, float] | None, interrupted: bool
    ) -> None:
        self._values = values
        self.workflow = workflow
        self.timings = timings
        self.interrupted = interrupted

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"the output has no {name!r}; it has {sorted(self._values)}") from None

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"PipelineOutput(workflow={self.workflow!r}, values={sorted(self._values)})"
