"""Composite blocks: a named sequence, a loop over timesteps, and a switch between workflows."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

from diffblocks.blocks.block import AbstractBlock


class Sequence(AbstractBlock):
    """Named blocks run in order. Sub-blocks are addressed by dotted paths (``"loop.denoise"``).

    Blocks keep their own ``name``; two siblings may not share one.
    """

    def __init__(self, *blocks: AbstractBlock, name: str = "sequence") -> None:
        self.name = name
        self._blocks: dict[str, AbstractBlock] = {}
        for block in blocks:
            self._add(block, len(self._blocks))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._blocks)

    @property
    def blocks(self) -> tuple[AbstractBlock, ...]:
        return tuple(self._blocks.values())

    def __iter__(self) -> Iterator[AbstractBlock]:
        return iter(self._blocks.values())

    def __len__(self) -> int:
        return len(self._blocks)

    def __getitem__(self, path: str) -> AbstractBlock:
        return self.get(path)

    def get(self, path: str) -> AbstractBlock:
        """The sub-block at a dotted ``path``."""
        head, _, rest = path.partition(".")
        if head not in self._blocks:
            raise KeyError(f"{self.name!r} has no block {head!r}; it has {list(self._blocks)}")
        block = self._blocks[head]
        if not rest:
            return block
        if isinstance(block, Sequence):
            return block.get(rest)
        if isinstance(block, Switch):
            return block.get(rest)
        raise KeyError(f"{path!r}: {head!r} is a leaf block and has no sub-block {rest!r}")

    def insert(self, block: AbstractBlock, *, before: str | None = None, after: str | None = None) -> Sequence:
        """Insert ``block`` before or after the named sibling (at the end when neither is given)."""
        if before is not None and after is not None:
            raise ValueError("pass before= or after=, not both")
        anchor = before if before is not None else after
        if anchor is None:
            index = len(self._blocks)
        else:
            if anchor not in self._blocks:
                raise KeyError(f"{self.name!r} has no block {anchor!r}; it has {list(self._blocks)}")
            index = list(self._blocks).index(anchor) + (1 if after is not None else 0)
        self._add(block, index)
        return self

    def replace(self, path: str, block: AbstractBlock) -> Sequence:
        """Put ``block`` in the place of the block at ``path``; it takes that place's name."""
        parent, name = self._parent_of(path)
        if name not in parent._blocks:
            raise KeyError(f"{parent.name!r} has no block {name!r}; it has {list(parent._blocks)}")
        block = copy.copy(block)
        block.name = name
        parent._blocks[name] = block
        return self

    def remove(self, path: str) -> AbstractBlock:
        """Remove and return the block at ``path``."""
        parent, name = self._parent_of(path)
        if name not in parent._blocks:
            raise KeyError(f"{parent.name!r} has no block {name!r}; it has {list(parent._blocks)}")
        return parent._blocks.pop(name)

    def _parent_of(self, path: str) -> tuple[Sequence, str]:
        head, _, name = path.rpartition(".")
        parent = self.get(head) if head else self
        if not isinstance(parent, Sequence):
            raise KeyError(f"{head!r} is not a sequence; blocks can only be replaced or removed inside sequences")
        return parent, name

    def _add(self, block: AbstractBlock, index: int) -> None:
        if not isinstance(block, AbstractBlock):
            raise TypeError(f"{self.name!r}: expected a block, got {type(block).__name__}")
        if block.name in self._blocks:
            raise ValueError(
                f"{self.name!r} already has a block named {block.name!r}: give one of them another name (name=...)"
            )
        items = list(self._blocks.items())
        items.insert(index, (block.name, block))
        self._blocks = dict(items)


class Loop(Sequence):
    """Run the body once per element of the input ``over`` (the denoising timesteps by default).

    Each iteration sets ``item`` (the current timestep ``t``), ``index`` (``step_index``) and ``count``
    (``num_steps``) before the body runs; values the body produces carry over to the next iteration.
    """

    def __init__(
        self,
        *body: AbstractBlock,
        name: str = "loop",
        over: str = "timesteps",
        item: str = "t",
        index: str = "step_index",
        count: str = "num_steps",
    ) -> None:
        super().__init__(*body, name=name)
        self.over, self.item, self.index, self.count = over, item, index, count


@dataclass(frozen=True)
class Branch:
    """One workflow of a :class:`Switch`: taken when every input in ``when`` is given (not None)."""

    name: str
    block: AbstractBlock
    when: tuple[str, ...] = ()


class Switch(AbstractBlock):
    """Pick one branch per call from the inputs the user gives; the first branch whose triggers are all given wins.

    A branch with no triggers is the default and must come last.
    """

    def __init__(self, *branches: Branch, name: str = "switch") -> None:
        self.name = name
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
        self.branches = tuple(Branch(b.name, b.block, tuple(b.when)) for b in branches)

    @property
    def workflows(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.branches)

    def workflow(self, name: str) -> AbstractBlock:
        """The blocks of one workflow."""
        for branch in self.branches:
            if branch.name == name:
                return branch.block
        raise KeyError(f"switch {self.name!r} has no workflow {name!r}; it has {list(self.workflows)}")

    def get(self, path: str) -> AbstractBlock:
        head, _, rest = path.partition(".")
        block = self.workflow(head)
        if not rest:
            return block
        if isinstance(block, (Sequence, Switch)):
            return block.get(rest)
        raise KeyError(f"{path!r}: {head!r} is a leaf block and has no sub-block {rest!r}")

    def select(self, given: frozenset[str] | set[str]) -> Branch | None:
        """The branch for these given input names (None when no branch matches)."""
        for branch in self.branches:
            if all(name in given for name in branch.when):
                return branch
        return None
