"""Module paths in diffusers' layer-config form: a block list (``fqn``) and indices into it.

Diffusers' perturbing guiders name their layers by ``LayerSkipConfig``-style dicts
(``{"fqn": "transformer_blocks", "indices": [7, 8]}``) or by bare indices into the model's block
list; they cannot take module paths. We read both forms as module paths, and write paths back in
the dict form when each one ends in a block index or is a container the model family maps to
block indices (:data:`~diffblocks.components.guiders.families.LAYER_STACKS`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

DEFAULT_STACK = "transformer_blocks"  # what diffusers' "auto" finds first in its DiTs

Stack = tuple[str, tuple[int, ...]]
"""A block list's module path and the indices of the blocks taken from it, in order."""


def merge_stacks(stacks: Iterable[Stack]) -> tuple[Stack, ...]:
    """``stacks`` with neighbours of the same block list joined, so equal layer sets compare equal."""
    merged: list[Stack] = []
    for fqn, indices in stacks:
        if merged and merged[-1][0] == fqn:
            merged[-1] = (fqn, merged[-1][1] + indices)
        else:
            merged.append((fqn, indices))
    return tuple(merged)


def stacks_from_configs(configs: Any) -> tuple[tuple[Stack, ...], float | None]:
    """The block lists (merged) and the dropout of diffusers layer-config dicts (one or a list).

    Raises:
        ValueError: a dict has no ``indices``, or the dicts give different dropouts.
    """
    items: list[Mapping[str, Any]] = [configs] if isinstance(configs, Mapping) else list(configs)
    stacks: list[Stack] = []
    dropouts: set[float] = set()
    for item in items:
        if "indices" not in item:
            raise ValueError(f"A layer config needs 'indices' (and an optional 'fqn'), got keys {sorted(item)}.")
        fqn = str(item.get("fqn", "auto"))
        indices = item["indices"]
        stacks.append((DEFAULT_STACK if fqn == "auto" else fqn, tuple(int(i) for i in _as_list(indices))))
        dropouts.add(float(item.get("dropout", 1.0)))
    if len(dropouts) > 1:
        raise ValueError(f"Layer configs with different dropouts {sorted(dropouts)} are not supported; use one.")
    return merge_stacks(stacks), dropouts.pop() if dropouts else None


def paths_of_stacks(stacks: Sequence[Stack]) -> tuple[str, ...]:
    """One module path per block: ``("transformer_blocks", (7, 8))`` gives ``transformer_blocks.7``, ``.8``."""
    return tuple(f"{fqn}.{index}" for fqn, indices in stacks for index in indices)


def stacks_of_paths(paths: Sequence[str], *, containers: Mapping[str, Stack]) -> tuple[Stack, ...] | None:
    """``paths`` as block lists and indices, or None when a path has no such form.

    Args:
        paths: module paths, e.g. ``("transformer_blocks.7", "mid_block")``.
        containers: paths that name no single block, mapped to the blocks they stand for in the
            model family at hand (e.g. ``"mid_block"`` to ``("mid_block.attentions", (0,))``).
    """
    stacks: list[Stack] = []
    for path in paths:
        parent, _, last = path.rpartition(".")
        if path in containers:
            stacks.append(containers[path])
        elif parent and last.isdigit():
            stacks.append((parent, (int(last),)))
        else:
            return None
    return merge_stacks(stacks)


def _as_list(indices: Any) -> list[Any]:
    return [indices] if isinstance(indices, int) else list(indices)


__all__ = ["DEFAULT_STACK", "Stack", "merge_stacks", "paths_of_stacks", "stacks_from_configs", "stacks_of_paths"]
