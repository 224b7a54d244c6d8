"""The examples of docs/models.md run, in order, in one namespace, and their asserts hold."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).parents[2] / "docs" / "models.md"


def test_models_doc_examples_run() -> None:
    examples = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(examples) >= 6
    namespace: dict[str, object] = {"__name__": "docs_models"}
    for number, code in enumerate(examples):
        exec(compile(code, f"{DOC.name}[{number}]", "exec"), namespace)  # noqa: S102
