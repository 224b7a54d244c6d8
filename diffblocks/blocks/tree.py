"""The block tree: one walk with paths, one structural copy, and edits that return new trees.

Everything that looks at a tree (plans, checks, introspection, saving) walks it with :func:`walk`;
everything that changes one rebuilds the path from the root with ``replace_children``, so trees
are values and an edit never reaches a tree someone else holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from diffblocks.blocks.block import AbstractBlock, Block


@dataclass(frozen=True, slots=True)
class Node:
    """One block of a tree where :func:`walk` found it.

    ``path`` is what :meth:`Sequence.get` takes (``"workflow.text2img.denoise.step"``): child names
    joined by dots, a switch's branch addressed by its branch name; the root's path is ``""``.
    """

    path: str
    block: AbstractBlock
    parent: Node | None = None

    @property
    def key(self) -> str:
        """The last segment of the path (the root's is empty)."""
        return self.path.rpartition(".")[2]

    @property
    def label(self) -> str:
        """The path, or the block's name for the root: how errors and tables name the block."""
        return self.path or self.block.name

    @property
    def depth(self) -> int:
        return 0 if self.parent is None else self.parent.depth + 1


def walk(root: AbstractBlock, *, skip: Callable[[Node], bool] | None = None) -> Iterator[Node]:
    """Every block of a tree, depth first, parents before children.

    Args:
        root: the tree.
        skip: leave out a node and everything under it when this returns True (e.g. the branches of
            a switch that a workflow does not take).

    Example:
        >>> from diffblocks.blocks import Loop, Sequence
        >>> from diffblocks.blocks.tree import walk
        >>> tree = Sequence(Loop(name="denoise"), Sequence(name="decode"), name="pipe")
        >>> [node.label for node in walk(tree)]
        ['pipe', 'denoise', 'decode']
    """
    stack = [Node("", root)]
    while stack:
        node = stack.pop()
        if skip is not None and skip(node):
            continue
        yield node
        block = node.block
        pairs = zip(block.child_names(), block.children(), strict=True)
        stack.extend(reversed([Node(join(node.path, key), child, node) for key, child in pairs]))


def render(root: AbstractBlock, indent: str = "") -> str:
    """A readable tree of a block and everything under it, one :meth:`~AbstractBlock.summary` per line."""
    lines: list[str] = []
    pads: dict[str, str] = {}
    for node in walk(root):
        parent = node.parent
        pad = indent if parent is None else pads[parent.path] + "  "
        heading = None if parent is None else parent.block.child_heading(node.key)
        if heading is not None:
            lines.append(pad + heading)
            pad += "  "
        pads[node.path] = pad
        lines.append(pad + node.block.summary())
    return "\n".join(lines)


def copy_tree(root: AbstractBlock) -> AbstractBlock:
    """The same tree built from new composites and unbound copies of its leaves (see :meth:`Block.unbound`)."""
    if isinstance(root, Block):
        return root.unbound()
    return root.replace_children(tuple(copy_tree(child) for child in root.children()))


def find(root: AbstractBlock, path: str) -> AbstractBlock:
    """The block at a dotted ``path`` (``""`` is the root itself)."""
    block = root
    for depth, key in enumerate(path.split(".") if path else ()):
        names = block.child_names()
        if key not in names:
            where = ".".join(path.split(".")[:depth]) or root.name
            if not names:
                raise KeyError(f"{path!r}: {where!r} is a leaf block and has no sub-block {key!r}")
            raise KeyError(f"{where!r} has no block {key!r}; it has {list(names)}")
        block = block.children()[names.index(key)]
    return block


def replaced(root: AbstractBlock, path: str, block: AbstractBlock) -> AbstractBlock:
    """A new tree with ``block`` in the place of the block at ``path``; it takes that place's name."""
    parent_path, key = _split(path)

    def swap(parent: AbstractBlock) -> AbstractBlock:
        index = _index(parent, key, parent_path)
        children = list(parent.children())
        children[index] = block.renamed(children[index].name)
        return parent.replace_children(tuple(children))

    return _rebuilt(root, parent_path, swap)


def inserted(
    root: AbstractBlock, block: AbstractBlock, *, before: str | None = None, after: str | None = None
) -> AbstractBlock:
    """A new tree with ``block`` before or after the block at a dotted path (at the root's end when neither given)."""
    if not isinstance(block, AbstractBlock):
        raise TypeError(f"{root.name!r}: expected a block, got {type(block).__name__}")
    if before is not None and after is not None:
        raise ValueError("pass before= or after=, not both")
    anchor = before if before is not None else after
    parent_path, key = _split(anchor) if anchor is not None else ("", "")

    def add(parent: AbstractBlock) -> AbstractBlock:
        children = list(parent.children())
        index = len(children) if anchor is None else _index(parent, key, parent_path) + (after is not None)
        children.insert(index, block)
        return parent.replace_children(tuple(children))

    return _rebuilt(root, parent_path, add)


def removed(root: AbstractBlock, path: str) -> AbstractBlock:
    """A new tree without the block at ``path``."""
    parent_path, key = _split(path)

    def drop(parent: AbstractBlock) -> AbstractBlock:
        children = list(parent.children())
        del children[_index(parent, key, parent_path)]
        return parent.replace_children(tuple(children))

    return _rebuilt(root, parent_path, drop)


def _rebuilt(root: AbstractBlock, path: str, change: Callable[[AbstractBlock], AbstractBlock]) -> AbstractBlock:
    """``root`` with the block at ``path`` changed, and every block above it rebuilt around the change."""
    if not path:
        return change(root)
    head, _, rest = path.partition(".")
    index = _index(root, head, "")
    children = list(root.children())
    children[index] = _rebuilt(children[index], rest, change)
    return root.replace_children(tuple(children))


def _index(parent: AbstractBlock, key: str, parent_path: str) -> int:
    names = parent.child_names()
    if key not in names:
        raise KeyError(f"{parent_path or parent.name!r} has no block {key!r}; it has {list(names)}")
    return names.index(key)


def _split(path: str) -> tuple[str, str]:
    parent, _, key = path.rpartition(".")
    return parent, key


def join(path: str, name: str) -> str:
    """``path.name``, or ``name`` at the root."""
    return f"{path}.{name}" if path else name
