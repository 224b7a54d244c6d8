"""Errors raised by the attention seam, and the long explanations they carry."""

from __future__ import annotations

_MSG_MISSING_PACKAGE = "attention backend '{backend}' needs the package {package}: {install}"

_MSG_UNSUPPORTED = (
    "attention backend '{backend}' cannot run this call:\n{reasons}\n"
    "Pick another backend (for example 'sdpa', or 'auto' to fall back per call); "
    "`attention_checks()` reports this before the kernel runs."
)

_MSG_INVALID_INPUTS = "{count} attention input error{plural} (backend '{backend}'):\n{reasons}"


def bullet_list(lines: list[str]) -> str:
    """Indent ``lines`` as a bulleted block for a multi-line error message."""
    return "\n".join(f"  - {line}" for line in lines)


class AttentionBackendUnavailableError(ImportError):
    """A backend was asked for but its optional package is not importable."""

    def __init__(self, *, backend: str, package: str, install: str) -> None:
        super().__init__(_MSG_MISSING_PACKAGE.format(backend=backend, package=package, install=install))
        self.backend = backend
        self.package = package


class UnsupportedAttentionError(ValueError):
    """A backend was called with inputs outside what it declares it supports."""

    def __init__(self, *, backend: str, reasons: list[str]) -> None:
        super().__init__(_MSG_UNSUPPORTED.format(backend=backend, reasons=bullet_list(reasons)))
        self.backend = backend
        self.reasons = tuple(reasons)


class AttentionInputError(ValueError):
    """Checks mode found inconsistent q/k/v/mask inputs; every problem is listed at once."""

    def __init__(self, *, backend: str, reasons: list[str]) -> None:
        count = len(reasons)
        super().__init__(
            _MSG_INVALID_INPUTS.format(
                count=count, plural="" if count == 1 else "s", backend=backend, reasons=bullet_list(reasons)
            )
        )
        self.backend = backend
        self.reasons = tuple(reasons)


ATTENTION_ERRORS = (AttentionBackendUnavailableError, UnsupportedAttentionError, AttentionInputError)

__all__ = [
    "ATTENTION_ERRORS",
    "AttentionBackendUnavailableError",
    "AttentionInputError",
    "UnsupportedAttentionError",
]
