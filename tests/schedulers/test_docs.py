"""The examples of docs/schedulers.md and of the scheduler docstrings run and their asserts hold."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

DOC = Path(__file__).parents[2] / "docs" / "schedulers.md"
MODULES = ["ddpm", "ddim", "pndm", "lms", "euler", "euler_ancestral", "heun", "dpm_solver", "unipc", "flow_match"]


def test_doc_page_examples_run() -> None:
    examples = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(examples) >= 5
    namespace: dict[str, object] = {}
    for number, code in enumerate(examples):  # one namespace, as a reader runs them in order
        exec(compile(code, f"{DOC.name}[{number}]", "exec"), namespace)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(f"diffblocks.components.schedulers.{name}")
    failed, attempted = doctest.testmod(module, raise_on_error=False, verbose=False)
    assert attempted > 0 and failed == 0
