"""The registry: allowlisted names, lazy imports, clear errors, entry-point plugins."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from diffblocks.registry import COMPONENTS, Registry, RegistryError


def test_resolves_allowlisted_transformers_classes() -> None:
    import transformers

    assert COMPONENTS.resolve(("transformers", "CLIPTextModel")) is transformers.CLIPTextModel
    assert ("transformers", "CLIPTokenizer") in COMPONENTS


def test_unknown_name_lists_the_allowed_ones() -> None:
    with pytest.raises(RegistryError) as info:
        COMPONENTS.resolve(("transformers", "AutoModel"))
    message = str(info.value)
    assert message.startswith("component transformers.AutoModel is not allowed. Allowed components: ")
    assert "transformers.CLIPTextModel" in message and "diffusers.UNet2DConditionModel" in message
    assert "'diffblocks.components' entry-point group" in message


def test_disallowed_module_is_never_imported() -> None:
    reg = Registry("component", entry_point_group=None)
    with pytest.raises(RegistryError):
        reg.resolve(("os", "system"))


def test_register_conflict_and_replace() -> None:
    reg = Registry("block", entry_point_group=None)
    reg.register(("lib", "A"), "collections:OrderedDict")
    with pytest.raises(RegistryError, match="already registered"):
        reg.register(("lib", "A"), "collections:Counter")
    reg.register(("lib", "A"), "collections:Counter", replace=True)
    import collections

    assert reg.resolve(("lib", "A")) is collections.Counter
    assert reg.key_of(collections.Counter) == ("lib", "A")


def test_broken_target_fails_by_name() -> None:
    reg = Registry("component", entry_point_group=None)
    reg.register(("lib", "Missing"), "collections:NoSuchThing")
    with pytest.raises(RegistryError, match="lib.Missing is registered as 'collections:NoSuchThing', which cannot be imported"):
        reg.resolve(("lib", "Missing"))


def test_bad_keys_are_type_errors() -> None:
    with pytest.raises(TypeError, match="pairs of strings"):
        COMPONENTS.resolve("UNet2DConditionModel")  # type: ignore[arg-type]


def test_plugins_come_from_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "fancy_plugin"
    package.mkdir()
    (package / "__init__.py").write_text("class FancyVAE:\n    pass\n")
    dist = tmp_path / "fancy_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fancy-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[diffblocks.components]\nfancy.FancyVAE = fancy_plugin:FancyVAE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("component", entry_point_group="diffblocks.components")
    cls = reg.resolve(("fancy", "FancyVAE"))
    assert cls.__name__ == "FancyVAE" and cls.__module__ == "fancy_plugin"
    sys.modules.pop("fancy_plugin", None)


def test_a_malformed_entry_point_of_another_package_is_skipped_and_the_others_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffblocks.registry import RegistryWarning

    package = tmp_path / "good_plugin"
    package.mkdir()
    (package / "__init__.py").write_text("class GoodVAE:\n    pass\n")
    for dist_name, entries in (
        ("broken_plugin", "NoLibraryDot = broken:Thing\nbroken.Thing = not a target\n"),
        ("good_plugin", "good.GoodVAE = good_plugin:GoodVAE\n"),
    ):
        dist = tmp_path / f"{dist_name}-1.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n")
        (dist / "entry_points.txt").write_text(f"[diffblocks.components]\n{entries}")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("component", entry_point_group="diffblocks.components")
    with pytest.warns(RegistryWarning) as caught:
        assert reg.resolve(("good", "GoodVAE")).__name__ == "GoodVAE"
    assert re.search(r"ignoring entry point 'NoLibraryDot' .* of package 'broken_plugin'.*'library\.ClassName'", str(caught[0].message))
    assert len(reg.skipped) == 2 and "'package.module:ClassName'" in reg.skipped[1]
    with pytest.raises(RegistryError, match="Skipped malformed entry points: ignoring entry point 'NoLibraryDot'"):
        reg.resolve(("broken", "Other"))
    assert reg.resolve(("good", "GoodVAE")).__name__ == "GoodVAE"  # later lookups still work
    sys.modules.pop("good_plugin", None)
