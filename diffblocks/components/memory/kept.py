"""Blocks kept on the device in a spare budget, lent back when another model's work needs the memory.

Under group offload the plan spends what the budget leaves spare on keeping some of a model's
repeated blocks on the device (``plan.kept``), so fewer stream each step. They are groups like
the streamed ones, with a pinned home that stays, but fetched once and not sent home after each
run. That home makes them cheap to lend: when a later block needs more room than the plan left
(a VAE decode at a size whose activations exceed it), :meth:`~diffblocks.components.memory.Mover.make_room`
releases kept groups of models not running (nothing is copied: the home is still there), and the
model's next forward fetches them back before its first layer. A decode that fits once they are
lent runs whole, as without a budget, instead of in tiles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import final

import torch

from diffblocks.components.memory.streams import StreamedGroup

Moved = Callable[[StreamedGroup, torch.device], None]


@final
class KeptGroups:
    """One model's kept groups: on the device, unless lent (see the module docstring).

    Args:
        groups: the groups, each with its home (pinned where the streams pin).
        moved: told of each group fetched (``device``) or sent home (``home``).
        device: where they run; home: where they wait while lent.
    """

    def __init__(self, groups: list[StreamedGroup], moved: Moved, *, device: torch.device, home: torch.device) -> None:
        self.groups, self.moved, self.device, self.home = groups, moved, device, home

    @property
    def nbytes(self) -> int:
        """Bytes of the groups, lent or not."""
        return sum(group.nbytes for group in self.groups)

    def ensure(self) -> None:
        """Fetch the groups that were lent (call before the model's first layer runs)."""
        for group in self.groups:
            if group.fetch():
                group.wait()
                self.moved(group, self.device)

    def lend(self, nbytes: int) -> int:
        """Send groups home (the last first) until ``nbytes`` are free or none is left; returns the bytes freed."""
        freed = 0
        for group in reversed(self.groups):
            if freed >= nbytes:
                break
            if group.release():
                freed += group.nbytes
                self.moved(group, self.home)
        return freed

    def release_all(self) -> None:
        self.lend(self.nbytes)
