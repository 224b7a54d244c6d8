"""The allowlist of classes a config may name by ``_class_name``, for values saved as JSON (guiders, quantizers).

A guider or a quantizer is saved as ``{"_class_name": ..., **settings}`` (its ``to_config``).
Reading one back maps the name to a class only through an allowlist: the built-in classes and
those registered since; an unknown name fails with the list of known ones, as torchao's
``config_from_dict`` does with its allowed modules. A built-in may be listed by the module that
defines it, imported on first lookup, so that an allowlist can sit below the classes it lists (this
module imports none of them: it is in the registry layer, under ``diffblocks.components``).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any, Generic, Protocol, TypeVar, final

from typing_extensions import Self


class Configurable(Protocol):
    """A class that builds its values from the mappings its ``to_config`` writes."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self: ...


T = TypeVar("T", bound=Configurable)


@final
class ConfigAllowlist(Mapping[str, "type[T]"], Generic[T]):
    """Classes by ``_class_name``: read-only as a mapping, extended by :meth:`register`.

    Args:
        kind: what the classes are, for messages (``"guider"``).
        built_in: name to class, or to the module of ``package`` that defines the class of that name.
        package: the package those modules are in.

    Example:
        >>> allowlist = ConfigAllowlist("scheduler", {"EulerDiscreteScheduler": "euler"},
        ...     package="diffblocks.components.schedulers")
        >>> allowlist["EulerDiscreteScheduler"].__name__
        'EulerDiscreteScheduler'
        >>> try:
        ...     allowlist.from_config({"_class_name": "Nope"})
        ... except ValueError as err:
        ...     assert "known schedulers: EulerDiscreteScheduler" in str(err)
    """

    def __init__(self, kind: str, built_in: Mapping[str, type[T] | str], *, package: str = "") -> None:
        self.kind = kind
        self._package = package
        self._targets: dict[str, type[T] | str] = dict(built_in)

    def __getitem__(self, name: str) -> type[T]:
        target = self._targets[name]
        if isinstance(target, str):
            target = getattr(importlib.import_module(f"{self._package}.{target}"), name)
            self._targets[name] = target
        return target

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    def register(self, cls: type[T]) -> type[T]:
        """Allow configs to name ``cls`` (usable as a class decorator).

        Raises:
            ValueError: another class is registered under the same name.
        """
        known = self.get(cls.__name__)
        if known is not None and known is not cls:
            raise ValueError(f"A {self.kind} named {cls.__name__!r} is already registered ({known.__module__}).")
        self._targets[cls.__name__] = cls
        return cls

    def from_config(self, config: Mapping[str, Any]) -> T:
        """Build the value a config names by ``_class_name``.

        Raises:
            ValueError: the name is missing or not registered (the message lists the known ones), or
                the settings are invalid.
        """
        name = config.get("_class_name")
        cls = self.get(name) if isinstance(name, str) else None
        if cls is None:
            raise ValueError(f"Unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(sorted(self))}.")
        return cls.from_config(config)


__all__ = ["ConfigAllowlist", "Configurable"]
