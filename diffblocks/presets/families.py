"""Model families by name: each family's blocks, default guider and the index class names it reads.

Each family module declares its :class:`Family` (``sd15.FAMILY``, ``tiny.preset.FAMILY``, ...). This
module lists where they live as module paths and imports one on first lookup, so it imports no
family: the tiny family builds on the SD 1.5 blocks, and the loader that reads both does not import
the tiny package, which would close an import cycle between the presets and their sub-packages.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from diffblocks.blocks import Sequence
from diffblocks.components.guiders import AbstractGuider

_BUILT_IN = {
    "sd15": "diffblocks.presets.sd15",
    "sdxl": "diffblocks.presets.sdxl",
    "flux": "diffblocks.presets.flux",
    "tiny": "diffblocks.presets.tiny.preset",
    # diffusers' ControlNet pipelines: a base family's blocks with ControlNet steps
    "sd15_controlnet": "diffblocks.presets.controlnet:SD15_CONTROLNET",
    "sdxl_controlnet": "diffblocks.presets.controlnet:SDXL_CONTROLNET",
    "flux_controlnet": "diffblocks.presets.controlnet:FLUX_CONTROLNET",
}


class Family:
    """A model family: its blocks, its default guider, and the index class names it reads.

    ``settings`` names index settings (``model_index.json`` keys beside the components, such as
    SDXL's ``force_zeros_for_empty_prompt``) that are passed to ``blocks`` as keyword arguments.
    ``install_hints`` says how to install each Python package that the family's index files refer
    to with ``package://`` (the tiny model's text encoder). ``modular`` is diffusers'
    ``(ModularPipeline class, blocks class)`` for the family, when diffusers has one: folders that
    diffusers' ``ModularPipeline`` saved name it, and ours name it too.
    """

    def __init__(
        self,
        name: str,
        blocks: Callable[..., Sequence],
        guider: Callable[[], AbstractGuider],
        classes: tuple[str, ...],
        *,
        settings: tuple[str, ...] = (),
        install_hints: Mapping[str, str] | None = None,
        modular: tuple[str, str] | None = None,
    ) -> None:
        self.name, self.blocks, self.guider, self.classes, self.settings = name, blocks, guider, classes, settings
        self.install_hints: Mapping[str, str] = dict(install_hints or {})
        self.modular = modular

    def build(self, settings: Mapping[str, Any]) -> Sequence:
        """The family's blocks, configured by the index settings it reads."""
        return self.blocks(**{key: settings[key] for key in self.settings if key in settings})


# a family, or the module whose FAMILY it is (imported on first lookup)
_FAMILIES: dict[str, Family | str] = dict(_BUILT_IN)


class _Families(Mapping[str, Family]):
    """Read-only view of the families that imports a built-in family's module when it is first looked up."""

    def __getitem__(self, name: str) -> Family:
        family = _FAMILIES[name]
        if isinstance(family, str):
            module, _, attribute = family.partition(":")  # "module" holds FAMILY; "module:NAME" holds NAME
            family = getattr(importlib.import_module(module), attribute or "FAMILY")
            assert isinstance(family, Family) and family.name == name, f"{_BUILT_IN[name]}.FAMILY is not {name!r}"
            _FAMILIES[name] = family
        return family

    def __iter__(self) -> Iterator[str]:
        return iter(_FAMILIES)

    def __len__(self) -> int:
        return len(_FAMILIES)


FAMILIES: Mapping[str, Family] = _Families()
"""Families by name (``"sd15"``, ``"sdxl"``, ``"flux"``, ``"tiny"``, and ``"sd15_controlnet"``, ``"sdxl_controlnet"``,
``"flux_controlnet"`` for diffusers' ControlNet pipelines); read-only, extended by :func:`register_family`."""


def register_family(family: Family) -> Family:
    """Let ``from_pretrained`` read the index class names of ``family``, and ``save_pretrained`` write them.

    Raises:
        ValueError: another family is registered under the same name.
    """
    known = FAMILIES.get(family.name)
    if known is not None and known is not family:
        raise ValueError(f"a family named {family.name!r} is already registered; choose another name")
    _FAMILIES[family.name] = family
    return family


def family_of(class_name: str | None, settings: Mapping[str, Any]) -> Family:
    """The family for an index's ``_class_name`` (or its ``family`` setting): a classic pipeline class,
    or diffusers' ``ModularPipeline`` class of the family."""
    if isinstance(settings.get("family"), str) and settings["family"] in FAMILIES:
        return FAMILIES[settings["family"]]
    for family in FAMILIES.values():
        if class_name in family.classes or (family.modular is not None and class_name == family.modular[0]):
            return family
    known = sorted(name for family in FAMILIES.values() for name in (*family.classes, *(family.modular or ())[:1]))
    raise ValueError(f"no preset reads pipelines of class {class_name!r}; supported: {', '.join(known)}")


__all__ = ["FAMILIES", "Family", "family_of", "register_family"]
