"""The model examples of docs/flux.md run and their asserts hold."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).parents[2] / "docs" / "flux.md"
MODEL_SECTIONS = ("Transformer", "Latent layout")


def _model_examples() -> list[str]:
    sections = re.split(r"^## ", DOC.read_text(), flags=re.MULTILINE)
    ours = [s for s in sections if s.splitlines()[0].strip() in MODEL_SECTIONS]
    return [block for s in ours for block in re.findall(r"```python\n(.*?)```", s, flags=re.DOTALL)]


def test_model_examples_run() -> None:
    examples = _model_examples()
    assert len(examples) >= 4
    namespace: dict[str, object] = {}
    for code in examples:  # one namespace: later examples reuse earlier names, as a reader would
        exec(compile(code, str(DOC), "exec"), namespace)
