"""Allowlisted names -> classes, imported lazily, extended by entry-point plugins."""

from __future__ import annotations

import importlib
import re
import warnings
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any

Key = tuple[str, str]

_MSG_UNKNOWN = "{kind} {key} is not allowed. Allowed {kind}s: {allowed}. {hint}"
_MSG_HINT = (
    "Register a class with registry.register((library, name), cls), or ship it in a package "
    "that declares it under the {group!r} entry-point group."
)


_ENTRY_NAME = re.compile(r"^[A-Za-z_][\w.-]*\.[A-Za-z_]\w*$")  # library.ClassName
_ENTRY_VALUE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")  # package.module:Class
_MSG_BAD_ENTRY = (
    "ignoring entry point {name!r} = {value!r} of {dist} in group {group!r}: {why}. "
    "The other plugins still load; the package's author should fix its entry_points."
)


class RegistryError(LookupError):
    """A name is not in the allowlist, or its target cannot be imported."""


class RegistryWarning(UserWarning):
    """An installed package declares a malformed plugin entry point; it is skipped, the others load."""


class Registry:
    """Maps ``(library, class_name)`` — as written in diffusers' index files — to allowed classes.

    Targets are classes or ``"module:attribute"`` strings imported on first use, so listing a class
    costs nothing until a pipeline needs it. Nothing outside the allowlist is ever imported.

    Example:
        >>> from diffblocks.registry import Registry
        >>> reg = Registry("component", entry_point_group=None)
        >>> reg.register(("builtins", "OrderedDict"), "collections:OrderedDict")
        >>> reg.resolve(("builtins", "OrderedDict")).__name__
        'OrderedDict'
    """

    def __init__(self, kind: str, *, entry_point_group: str | None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._targets: dict[Key, type | str] = {}
        self._plugins_loaded = entry_point_group is None
        self.skipped: list[str] = []  # malformed entry points of other packages, with the reason

    def register(self, key: Key, target: type | str, *, replace: bool = False) -> None:
        """Allow ``key`` and map it to ``target`` (a class or a ``"module:attribute"`` string)."""
        key = _normalise(key)
        if key in self._targets and not replace and self._targets[key] != target:
            raise RegistryError(f"{self.kind} {key} is already registered as {self._targets[key]!r}; pass replace=True")
        self._targets[key] = target

    def resolve(self, key: Key) -> type:
        """The class for ``key``; raises :class:`RegistryError` listing the allowed names."""
        key = _normalise(key)
        if key not in self._targets:
            self._load_plugins()
        if key not in self._targets:
            raise RegistryError(self._unknown_message(key))
        target = self._targets[key]
        if isinstance(target, str):
            target = _import(target, key)
            self._targets[key] = target
        return target

    def key_of(self, cls: type) -> Key:
        """The registered key of a class (the first one, with diffusers' names preferred over aliases)."""
        self._load_plugins()
        qualified = f"{cls.__module__}:{cls.__qualname__}"
        for key, target in self._targets.items():
            if target is cls or target == qualified:
                return key
        for key, target in self._targets.items():
            # string targets may name a re-exporting module: import those whose name matches, then compare
            if isinstance(target, str) and key[1] == cls.__name__ and self.resolve(key) is cls:
                return key
        raise RegistryError(
            f"{cls.__module__}.{cls.__qualname__} is not a registered {self.kind}; register it to save it in an index."
        )

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, tuple):
            return False
        self._load_plugins()
        return _normalise(key) in self._targets  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Key]:
        self._load_plugins()
        return iter(sorted(self._targets))

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        assert self.entry_point_group is not None
        for ep in entry_points(group=self.entry_point_group):
            # one broken package must not cost every other plugin (or this process) its lookups
            why = (
                "the name must be 'library.ClassName'"
                if not _ENTRY_NAME.match(ep.name)
                else "the value must be 'package.module:ClassName'"
                if not _ENTRY_VALUE.match(ep.value)
                else None
            )
            if why is not None:
                dist = f"package {ep.dist.name!r}" if ep.dist is not None else "an installed package"
                message = _MSG_BAD_ENTRY.format(name=ep.name, value=ep.value, dist=dist, group=self.entry_point_group, why=why)
                self.skipped.append(message)
                warnings.warn(message, RegistryWarning, stacklevel=3)
                continue
            library, _, name = ep.name.rpartition(".")
            self._targets.setdefault((library, name), ep.value)

    def _unknown_message(self, key: Key) -> str:
        allowed = ", ".join(f"{lib}.{name}" for lib, name in sorted(self._targets))
        hint = _MSG_HINT.format(group=self.entry_point_group) if self.entry_point_group else ""
        if self.skipped:
            hint += " Skipped malformed entry points: " + " ".join(self.skipped)
        return _MSG_UNKNOWN.format(kind=self.kind, key=f"{key[0]}.{key[1]}", allowed=allowed, hint=hint).strip()


def _normalise(key: Any) -> Key:
    if not (isinstance(key, (tuple, list)) and len(key) == 2 and all(isinstance(k, str) for k in key)):
        raise TypeError(f"registry keys are (library, class_name) pairs of strings, got {key!r}")
    return (key[0], key[1])


def _import(target: str, key: Key) -> type:
    module_name, _, attribute = target.partition(":")
    try:
        value: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError) as err:
        raise RegistryError(f"{key[0]}.{key[1]} is registered as {target!r}, which cannot be imported: {err}") from err
    if not isinstance(value, type):
        raise RegistryError(f"{key[0]}.{key[1]} is registered as {target!r}, which is not a class")
    return value
