"""Every ```python block in docs/ runs, page by page, in one namespace per page."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(p for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")] if "```python" in p.read_text())


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_doc_examples_run(page: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a real module, so classes defined on the page resolve their annotations like user code does
    module = types.ModuleType(f"docs_{page.stem}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for number, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)):
        exec(compile(code, f"{page.name}[{number}]", "exec", dont_inherit=True), module.__dict__)  # noqa: S102
