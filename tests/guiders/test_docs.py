"""The examples of docs/guiders.md run, in order, and their asserts hold."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).parents[2] / "docs" / "guiders.md"


def test_doc_examples_run() -> None:
    examples = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(examples) >= 6
    namespace: dict[str, object] = {}
    for code in examples:  # one namespace: later examples reuse earlier names, as a reader would
        exec(compile(code, str(DOC), "exec"), namespace)


def test_docstring_examples_run() -> None:
    import doctest

    from diffblocks.components.guiders import classifier_free, perturbed_attention

    for module in (classifier_free, perturbed_attention):
        failures, tried = doctest.testmod(module, raise_on_error=False, verbose=False)
        assert tried > 0 and failures == 0, module.__name__
