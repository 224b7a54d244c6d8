"""The import graph: layers only import downwards, and packages import each other without cycles.

Every ``import`` statement of the package is read with ``ast`` (at module level, inside functions and
under ``TYPE_CHECKING`` alike), so an import hidden in a function to dodge a cycle still counts. Names
a registry lists as data (``"diffblocks.presets.format:DiffusersFormat"``) are not imports: that is
how a lower layer reaches code above it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffblocks"

LAYERS = (
    "diffblocks._version",
    "diffblocks.registry",
    "diffblocks.components",
    "diffblocks.blocks",
    "diffblocks.presets",
    "diffblocks.scale",
    "diffblocks",  # the package's face: the names users reach for first, imported lazily
    "diffblocks.cli",
    "diffblocks.__main__",
)
"""Bottom to top: a module may import its own layer and the layers below it."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
PACKAGES = {_module_name(path) for path in PACKAGE.rglob("__init__.py")}


def _imports(module: str, source: str | None = None) -> list[tuple[str, int]]:
    """The package's modules that ``module`` imports, with the line of each import statement."""
    found: list[tuple[str, int]] = []
    tree = ast.parse(MODULES[module].read_text() if source is None else source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".") if module in PACKAGES else module.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            # ``from package import submodule`` imports the submodule
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "diffblocks":
                while target not in MODULES:
                    target = target.rpartition(".")[0]
                found.append((target, node.lineno))
    return found


def _layer(module: str) -> int:
    matches = [i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} belongs to no layer: add it to LAYERS"
    return max(matches, key=lambda i: len(LAYERS[i]))


def _unit(module: str) -> str:
    """The package a module counts as part of: ``diffblocks.X.Y`` when that is a package, else ``diffblocks.X``.

    A sub-package deeper down (``components.attention.backends``) is part of its parent's implementation.
    """
    parts = module.split(".")
    return ".".join(parts[:3]) if ".".join(parts[:3]) in PACKAGES else ".".join(parts[:2])


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = [
        f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} imports {target} "
        f"({LAYERS[_layer(module)]} -> {LAYERS[_layer(target)]})"
        for module in MODULES
        for target, line in _imports(module)
        if _layer(target) > _layer(module)
    ]
    assert not upward, "imports against the layers " + " -> ".join(LAYERS) + ":\n" + "\n".join(upward)


def test_packages_import_each_other_without_cycles() -> None:
    edges: dict[str, set[str]] = defaultdict(set)
    evidence: dict[tuple[str, str], str] = {}
    for module in MODULES:
        for target, line in _imports(module):
            source, dest = _unit(module), _unit(target)
            if source != dest:
                edges[source].add(dest)
                evidence.setdefault((source, dest), f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}")
    cycles = [cycle for cycle in _strongly_connected(edges) if len(cycle) > 1]
    described = [
        "cycle " + ", ".join(sorted(cycle)) + ": " + "; ".join(
            f"{a} -> {b} ({evidence[a, b]})" for a in sorted(cycle) for b in sorted(edges[a] & cycle)
        )
        for cycle in cycles
    ]
    assert not cycles, "\n".join(described)


def test_the_walk_sees_imports_inside_functions() -> None:
    """The checks above are only as good as the walk: an import hidden in a method is still an arrow."""
    hidden = """
class Pipeline:
    def save_pretrained(self, folder):
        from diffblocks.presets.saving import save_pretrained
        from ..presets import loading
        return save_pretrained(self, folder)
"""
    found = _imports("diffblocks.blocks.pipeline", hidden)
    assert found == [("diffblocks.presets.saving", 4), ("diffblocks.presets.loading", 5)]
    assert all(_layer(target) > _layer("diffblocks.blocks.pipeline") for target, _ in found)
    assert "diffblocks.presets.tiny.preset" in {target for target, _ in _imports("diffblocks.cli")}  # in a function


def _strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components of a directed graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: set[str] = set()
            while True:
                top = stack.pop()
                component.add(top)
                if top == node:
                    break
            components.append(component)

    for node in sorted(set(edges) | {n for targets in edges.values() for n in targets}):
        if node not in index:
            visit(node)
    return components
