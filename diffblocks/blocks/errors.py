"""Errors that point at the block, the field and the fix, gathered into one message."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a pipeline or a call, located in the block tree."""

    block: str
    field: str
    message: str
    fix: str = ""
    where: str = ""

    def render(self) -> str:
        lines = [f"[{self.block}] {self.field}: {self.message}"]
        if self.fix:
            lines.append(f"    fix: {self.fix}")
        if self.where:
            lines.append(f"    declared at {self.where}")
        return "\n".join(lines)


class _ProblemsError(ValueError):
    kind = "problem"

    def __init__(self, problems: Iterable[Problem], *, context: str = "") -> None:
        self.problems = tuple(problems)
        self.context = context
        count = len(self.problems)
        head = f"{count} {self.kind}{'s' if count != 1 else ''}" + (f" in {context}" if context else "")
        super().__init__(head + ":\n" + "\n".join(p.render() for p in self.problems))


class PlanError(_ProblemsError):
    """A pipeline cannot be built: missing inputs or components, incompatible types, wrong order."""

    kind = "pipeline error"


class InputError(_ProblemsError):
    """A call's inputs are invalid; raised before any block runs."""

    kind = "input error"


class FieldError(ValueError):
    """Raised by :meth:`Block.check` for a bad user input; the pipeline reports it with the block's path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
