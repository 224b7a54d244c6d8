"""The command line."""

from __future__ import annotations

import pytest

from diffblocks.cli import main


def test_env_prints_versions_and_passes_self_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("diffblocks 0.1.0 on Python")
    assert "torch" in out and "self-check: ok (plan, validation, loop, components)" in out


def test_unknown_command_exits_with_usage() -> None:
    with pytest.raises(SystemExit) as info:
        main(["paint"])
    assert info.value.code == 2
