"""A seeded Brownian motion sampled on a dyadic tree, for SDE samplers that query it at any times.

Brownian-tree noise (Kidger et al., 2021, "Efficient and Accurate Gradients for Neural SDEs") lets
a sampler ask for the increment ``W(tb) - W(ta)`` over any interval and get the same path for one
seed whatever the queries: the increment over an interval is drawn once, and split at the
interval's midpoint by a Brownian bridge seeded from the node's position in the tree.

This is torchsde's ``BrownianInterval`` as diffusers' ``DPMSolverSDEScheduler`` configures it
(``halfway_tree=True``, ``tol=1e-6``, ``pool_size=24``, no Lévy area): node seeds come from
numpy's ``SeedSequence`` keyed by ``(2 * parent_key + side, depth)`` and each bridge draws
``torch.randn`` from a generator seeded with them, so a seed gives torchsde's noise.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

_POOL_SIZE = 24  # SeedSequence entropy pool, as diffusers configures torchsde
_DIGITS = 6  # times are resolved to tol = 1e-6, i.e. rounded to 6 decimals
_CACHE_SIZE = 45  # recently computed increments kept (torchsde's default LRU size)


@dataclass(eq=False)
class _Node:
    """The interval ``[start, end]``; once split, its bridge seed and its two halves."""

    start: float
    end: float
    parent: _Node | None = None
    is_left: bool = True
    key: int = 0  # position among the nodes of its depth: 2 * parent key + (0 left, 1 right)
    depth: int = 0
    midway: float | None = None
    seed: int = 0
    children: tuple[_Node, _Node] | None = field(default=None, repr=False)


class BrownianTree:
    """A Brownian motion on ``[t0, t1]``, one sample of ``shape`` per time, fixed by ``seed``.

    Args:
        t0: start of the interval the motion is defined on.
        t1: end of it (``t0 < t1``).
        shape: shape of ``W(t)``: the sample's shape.
        dtype: dtype of the noise.
        device: where the noise is drawn (a CUDA generator draws other numbers than a CPU one).
        seed: the entropy of the whole path.

    Example:
        >>> tree = BrownianTree(0.1, 10.0, shape=(2, 3), dtype=torch.float32, device="cpu", seed=7)
        >>> whole = tree.increment(0.1, 10.0)
        >>> parts = tree.increment(0.1, 3.0) + tree.increment(3.0, 10.0)
        >>> bool(torch.allclose(whole, parts, atol=1e-5))
        True
    """

    def __init__(
        self,
        t0: float,
        t1: float,
        *,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        seed: int,
    ) -> None:
        if not t0 < t1:
            raise ValueError(f"a Brownian tree needs t0 < t1, got t0={t0} and t1={t1}.")
        self.shape, self.dtype, self.device, self.seed = shape, dtype, device, seed
        self._root = _Node(round(t0, _DIGITS), round(t1, _DIGITS))
        root_seed = int(np.random.SeedSequence(entropy=seed, pool_size=_POOL_SIZE).generate_state(3)[0])
        self._root_increment = self._randn(root_seed) * math.sqrt(t1 - t0)
        self._cache: OrderedDict[int, Tensor] = OrderedDict()

    def increment(self, ta: float, tb: float) -> Tensor:
        """``W(tb) - W(ta)`` for ``ta <= tb``, both clamped into ``[t0, t1]``."""
        root = self._root
        ta, tb = min(max(ta, root.start), root.end), min(max(tb, root.start), root.end)
        if ta > tb:
            raise ValueError(f"increment needs ta <= tb, got ta={ta} and tb={tb}.")
        if ta == tb:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        nodes: list[_Node] = []
        self._locate(root, round(ta, _DIGITS), round(tb, _DIGITS), nodes)
        total = self._node_increment(nodes[0])
        for node in nodes[1:]:
            total = total + self._node_increment(node)
        return total

    def _locate(self, node: _Node, ta: float, tb: float, out: list[_Node]) -> None:
        """Append to ``out``, in order, the nodes whose intervals tile ``[ta, tb]``, splitting as needed."""
        if ta == node.start and tb == node.end:
            out.append(node)
            return
        if node.children is None:
            self._split_towards(node, tb if ta == node.start else ta)
        assert node.children is not None and node.midway is not None
        left, right = node.children
        if tb <= node.midway:
            self._locate(left, ta, tb, out)
        elif ta >= node.midway:
            self._locate(right, ta, tb, out)
        else:
            self._locate(left, ta, node.midway, out)
            self._locate(right, node.midway, tb, out)

    def _split_towards(self, node: _Node, point: float) -> None:
        """Halve ``node``, then keep halving the half holding ``point`` until ``point`` is a midpoint."""
        while True:
            self._halve(node)
            assert node.children is not None and node.midway is not None
            if point == node.midway:
                return
            node = node.children[1] if point > node.midway else node.children[0]

    def _halve(self, node: _Node) -> None:
        midway = round(0.5 * (node.end + node.start), _DIGITS)
        if node.parent is not None:
            node.key = 2 * node.parent.key + (0 if node.is_left else 1)
            node.depth = node.parent.depth + 1
        sequence = np.random.SeedSequence(entropy=self.seed, spawn_key=(node.key, node.depth), pool_size=_POOL_SIZE)
        node.midway, node.seed = midway, int(sequence.generate_state(4)[0])
        node.children = (_Node(node.start, midway, node, True), _Node(midway, node.end, node, False))

    def _node_increment(self, node: _Node) -> Tensor:
        """The increment over ``node``: the parent's, split by a Brownian bridge at the parent's midpoint."""
        parent = node.parent
        if parent is None:
            return self._root_increment
        cached = self._cache.get(id(node))
        if cached is not None:
            self._cache.move_to_end(id(node))
            return cached
        whole = self._node_increment(parent)
        assert parent.midway is not None
        h_reciprocal = 1 / (parent.end - parent.start)
        left_diff, right_diff = parent.midway - parent.start, parent.end - parent.midway
        # W(mid) - W(start) given the whole increment: mean in proportion, variance of the bridge
        left = whole * left_diff * h_reciprocal + math.sqrt(left_diff * right_diff * h_reciprocal) * self._randn(
            parent.seed
        )
        result = left if node.is_left else whole - left
        self._cache[id(node)] = result
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return result

    def _randn(self, seed: int) -> Tensor:
        generator = torch.Generator(self.device).manual_seed(seed)
        return torch.randn(self.shape, dtype=self.dtype, device=self.device, generator=generator)


__all__ = ["BrownianTree"]
