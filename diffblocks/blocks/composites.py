"""Composite blocks: a named sequence, a loop over timesteps, and a switch between workflows.

Composites are immutable values: editing one (``insert``, ``replace``, ``remove``) returns a new
tree and leaves the original as it was. Their children are seen and rebuilt through
``children()`` / ``replace_children()``, like every other block.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, Self, final

from diffblocks.blocks import tree
from diffblocks.blocks.block import AbstractBlock


class AbstractComposite(AbstractBlock):
    """A block made of blocks, addressed by dotted paths (``"loop.denoise"``); immutable once built."""

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "name", name)  # the one write; __setattr__ refuses every later one

    def __setattr__(self, attr: str, value: Any) -> NoReturn:
        raise AttributeError(
            f"{type(self).__name__} {self.name!r} is immutable: insert(), replace() and remove() return a new tree"
        )

    @abstractmethod
    def children(self) -> tuple[AbstractBlock, ...]: ...

    def __repr__(self) -> str:
        return tree.render(self)

    @property
    def names(self) -> tuple[str, ...]:
        """The names its children are addressed by."""
        return self.child_names()

    def __iter__(self) -> Iterator[AbstractBlock]:
        return iter(self.children())

    def __len__(self) -> int:
        return len(self.children())

    def __getitem__(self, path: str) -> AbstractBlock:
        return self.get(path)

    def get(self, path: str) -> AbstractBlock:
        """The sub-block at a dotted ``path``."""
        return tree.find(self, path)

    def insert(self, block: AbstractBlock, *, before: str | None = None, after: str | None = None) -> Self:
        """A new tree with ``block`` before or after the block at a dotted path (at the end when neither is given)."""
        return self._same_kind(tree.inserted(self, block, before=before, after=after))

    def replace(self, path: str, block: AbstractBlock) -> Self:
        """A new tree with ``block`` in the place of the block at ``path``; it takes that place's name."""
        return self._same_kind(tree.replaced(self, path, block))

    def remove(self, path: str) -> Self:
        """A new tree without the block at ``path``."""
        return self._same_kind(tree.removed(self, path))

    def _same_kind(self, root: AbstractBlock) -> Self:
        assert isinstance(root, type(self))  # an edit below the root rebuilds the root with replace_children
        return root


def _named(owner: str, blocks: tuple[AbstractBlock, ...]) -> tuple[AbstractBlock, ...]:
    """Children addressed by their names (a sequence's blocks, a loop's body): two siblings may not share one."""
    seen: set[str] = set()
    for block in blocks:
        if not isinstance(block, AbstractBlock):
            raise TypeError(f"{owner!r}: expected a block, got {type(block).__name__}")
        if block.name in seen:
            raise ValueError(
                f"{owner!r} already has a block named {block.name!r}: give one of them another name (name=...)"
            )
        seen.add(block.name)
    return blocks


@final
class Sequence(AbstractComposite):
    """Named blocks run in order. Sub-blocks are addressed by dotted paths (``"loop.denoise"``).

    Blocks keep their own ``name``; two siblings may not share one.
    """

    blocks: tuple[AbstractBlock, ...]

    def __init__(self, *blocks: AbstractBlock, name: str = "sequence") -> None:
        super().__init__(name)
        object.__setattr__(self, "blocks", _named(name, blocks))

    def children(self) -> tuple[AbstractBlock, ...]:
        return self.blocks

    def replace_children(self, children: tuple[AbstractBlock, ...]) -> Sequence:
        return Sequence(*children, name=self.name)

    def renamed(self, name: str) -> Sequence:
        return Sequence(*self.blocks, name=name)


@final
class Loop(AbstractComposite):
    """Run the body once per element of the input ``over`` (the denoising timesteps by default).

    Each iteration sets ``item`` (the current timestep ``t``), ``index`` (``step_index``) and ``count``
    (``num_steps``) before the body runs; values the body produces carry over to the next iteration.
    """

    blocks: tuple[AbstractBlock, ...]
    over: str
    item: str
    index: str
    count: str

    def __init__(
        self,
        *body: AbstractBlock,
        name: str = "loop",
        over: str = "timesteps",
        item: str = "t",
        index: str = "step_index",
        count: str = "num_steps",
    ) -> None:
        super().__init__(name)
        values = {"blocks": _named(name, body), "over": over, "item": item, "index": index, "count": count}
        for attr, value in values.items():
            object.__setattr__(self, attr, value)

    def children(self) -> tuple[AbstractBlock, ...]:
        return self.blocks

    def replace_children(self, children: tuple[AbstractBlock, ...]) -> Loop:
        return self._with(children, self.name)

    def summary(self) -> str:
        return f"{self.name}: Loop over {self.over} ({self.item}, {self.index})"

    def renamed(self, name: str) -> Loop:
        return self._with(self.blocks, name)

    def _with(self, body: tuple[AbstractBlock, ...], name: str) -> Loop:
        return Loop(*body, name=name, over=self.over, item=self.item, index=self.index, count=self.count)


@dataclass(frozen=True)
class Branch:
    """One workflow of a :class:`Switch`: taken when every input in ``when`` is given (not None)."""

    name: str
    block: AbstractBlock
    when: tuple[str, ...] = ()


@final
class Switch(AbstractComposite):
    """Pick one branch per call from the inputs the user gives; the first branch whose triggers are all given wins.

    A branch with no triggers is the default and must come last. The switch's children are its
    branches' blocks, addressed by branch name (``"workflow.img2img"``).
    """

    branches: tuple[Branch, ...]

    def __init__(self, *branches: Branch, name: str = "switch") -> None:
        super().__init__(name)
        if not branches:
            raise ValueError(f"switch {name!r} needs at least one branch")
        names = [b.name for b in branches]
        if len(set(names)) != len(names):
            raise ValueError(f"switch {name!r} has duplicate branch names: {names}")
        for branch in branches[:-1]:
            if not branch.when:
                raise ValueError(
                    f"switch {name!r}: branch {branch.name!r} has no trigger inputs, so the branches after it "
                    "could never run; put the default branch last"
                )
        object.__setattr__(self, "branches", tuple(Branch(b.name, b.block, tuple(b.when)) for b in branches))

    @property
    def workflows(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.branches)

    def branch(self, name: str) -> Branch:
        """The branch of one workflow."""
        for branch in self.branches:
            if branch.name == name:
                return branch
        raise KeyError(f"switch {self.name!r} has no workflow {name!r}; it has {list(self.workflows)}")

    def workflow(self, name: str) -> AbstractBlock:
        """The blocks of one workflow."""
        return self.branch(name).block

    def children(self) -> tuple[AbstractBlock, ...]:
        return tuple(b.block for b in self.branches)

    def child_names(self) -> tuple[str, ...]:
        return self.workflows

    def replace_children(self, children: tuple[AbstractBlock, ...]) -> Switch:
        if len(children) != len(self.branches):
            raise ValueError(
                f"switch {self.name!r} has {len(self.branches)} branches ({', '.join(self.workflows)}), "
                f"not {len(children)}: blocks are added and removed inside a branch, not beside it"
            )
        branches = (dataclasses.replace(b, block=child) for b, child in zip(self.branches, children))
        return Switch(*branches, name=self.name)

    def child_heading(self, key: str) -> str:
        when = self.branch(key).when
        return f"[{key}] ({'when ' + ', '.join(when) + ' given' if when else 'default'})"

    def renamed(self, name: str) -> Switch:
        return Switch(*self.branches, name=name)

    def select(self, given: frozenset[str] | set[str]) -> Branch | None:
        """The branch for these given input names (None when no branch matches)."""
        for branch in self.branches:
            if all(name in given for name in branch.when):
                return branch
        return None
