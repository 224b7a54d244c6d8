"""Memory: offload policies as values, a budget, and a planner that picks the cheapest policy that fits.

See ``docs/memory.md``.
"""

from diffblocks.components.memory.disk import DiskOffload, MemoryMap
from diffblocks.components.memory.measure import ModelSize, measure
from diffblocks.components.memory.mover import Mover, OnMove
from diffblocks.components.memory.oom import OffloadTightened
from diffblocks.components.memory.placement import Placement, changing_tensors
from diffblocks.components.memory.planner import LADDER, MemoryBudgetError, MemoryPlan, plan_memory
from diffblocks.components.memory.policies import (
    AbstractOffload,
    Attached,
    GroupOffload,
    LeafOffload,
    ModelOffload,
    NoOffload,
    execution_device,
)
from diffblocks.components.memory.sizes import ByteSize

__all__ = [
    "LADDER",
    "AbstractOffload",
    "Attached",
    "ByteSize",
    "DiskOffload",
    "GroupOffload",
    "LeafOffload",
    "MemoryBudgetError",
    "MemoryMap",
    "MemoryPlan",
    "ModelOffload",
    "ModelSize",
    "Mover",
    "NoOffload",
    "OffloadTightened",
    "OnMove",
    "Placement",
    "changing_tensors",
    "execution_device",
    "measure",
    "plan_memory",
]
