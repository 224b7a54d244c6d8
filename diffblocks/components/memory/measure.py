"""What a model holds, by the pieces an offload policy moves: the whole, its repeated blocks, its leaves."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import final

from torch import nn

from diffblocks.components.quantizers.memory import component_memory


@final
@dataclass(frozen=True)
class ModelSize:
    """A model's bytes, as the offload policies see it.

    Attributes:
        total: every tensor the model holds (quantized tensors at their stored size).
        blocks: the bytes of each entry of each outermost ``nn.ModuleList`` (the repeated blocks that
            group offload streams), one tuple per list, the lists sorted (their order means nothing).
        largest_leaf: the bytes of the largest module's own tensors (what leaf offload holds at once).
        loading: the most bytes of CPU memory loading the model straight into memory maps holds at
            once, its largest tensor (None: it cannot load so, and is read into CPU memory whole).
    """

    total: int
    blocks: tuple[tuple[int, ...], ...] = ()
    largest_leaf: int = 0
    loading: int | None = field(default=None, repr=False)

    @property
    def loading_peak(self) -> int:
        """The most bytes of CPU memory loading holds at once under disk offload (see ``loading``)."""
        return self.total if self.loading is None else self.loading

    @property
    def outside_blocks(self) -> int:
        """Bytes outside the repeated blocks (embeddings, norms, heads): group offload keeps them resident."""
        return self.total - sum(sum(each) for each in self.blocks)

    def largest_group(self, blocks_per_group: int) -> int:
        """The bytes of the largest run of ``blocks_per_group`` consecutive blocks of one list."""
        return max(
            (sum(sizes[i : i + blocks_per_group]) for sizes in self.blocks for i in range(0, len(sizes), blocks_per_group)),
            default=0,
        )


def measure(module: nn.Module) -> ModelSize:
    """Measure ``module`` (on any device, the meta device included: only shapes and dtypes are read).

    Quantized models count at their stored size: the whole model through
    :func:`~diffblocks.components.quantizers.memory.component_memory`, and its parts scaled by the
    same ratio, since a quantizer shrinks the repeated blocks' weights alike.

    Example:
        >>> import torch
        >>> blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
        >>> size = measure(torch.nn.ModuleDict({"proj": torch.nn.Linear(4, 2), "blocks": blocks}))
        >>> size
        ModelSize(total=200, blocks=((80, 80),), largest_leaf=80)
        >>> size.outside_blocks, size.largest_group(2)
        (40, 160)
    """
    plain = _bytes(module)
    stored = component_memory("", module).bytes
    scale = stored / plain if plain else 1.0
    blocks = tuple(sorted(tuple(round(_bytes(block) * scale) for block in each) for each in repeated_blocks(module)))
    leaves = (round(_bytes(sub, recurse=False) * scale) for sub in module.modules())
    return ModelSize(total=stored, blocks=blocks, largest_leaf=max(leaves, default=0))


def repeated_blocks(module: nn.Module) -> Iterator[nn.ModuleList]:
    """The outermost ``nn.ModuleList`` children of ``module``, in definition order (nested lists are inside their group)."""
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            yield child
        else:
            yield from repeated_blocks(child)


def _bytes(module: nn.Module, *, recurse: bool = True) -> int:
    tensors = [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]
    return sum(t.numel() * t.element_size() for t in tensors)
