"""Scheduler classes by diffusers class name: load any ``scheduler_config.json`` into the right one."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from diffblocks.components.hub import resolve_folder
from diffblocks.components.schedulers.base import CONFIG_NAME, AbstractScheduler, read_config
from diffblocks.components.schedulers.ddim import DDIMScheduler
from diffblocks.components.schedulers.ddpm import DDPMScheduler
from diffblocks.components.schedulers.dpm_solver import DPMSolverMultistepScheduler
from diffblocks.components.schedulers.dpm_solver_sde import DPMSolverSDEScheduler
from diffblocks.components.schedulers.euler import EulerDiscreteScheduler
from diffblocks.components.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from diffblocks.components.schedulers.flow_match import FlowMatchEulerDiscreteScheduler
from diffblocks.components.schedulers.flow_match_heun import FlowMatchHeunDiscreteScheduler
from diffblocks.components.schedulers.heun import HeunDiscreteScheduler
from diffblocks.components.schedulers.lcm import LCMScheduler
from diffblocks.components.schedulers.lms import LMSDiscreteScheduler
from diffblocks.components.schedulers.pndm import PNDMScheduler
from diffblocks.components.schedulers.tcd import TCDScheduler
from diffblocks.components.schedulers.unipc import UniPCMultistepScheduler

SCHEDULERS: dict[str, type[AbstractScheduler]] = {
    cls.__name__: cls
    for cls in (
        DDPMScheduler,
        DDIMScheduler,
        PNDMScheduler,
        LMSDiscreteScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        HeunDiscreteScheduler,
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        DPMSolverSDEScheduler,
        LCMScheduler,
        TCDScheduler,
        FlowMatchHeunDiscreteScheduler,
    )
}
"""The allowed scheduler classes, keyed by the diffusers ``_class_name`` they read."""


def scheduler_from_config(config: Mapping[str, Any]) -> AbstractScheduler:
    """Build the scheduler that ``config["_class_name"]`` names.

    Raises:
        ValueError: the class name is missing or not one of :data:`SCHEDULERS`, or a value is invalid.
    """
    name = config.get("_class_name")
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler _class_name {name!r}; known: {', '.join(sorted(SCHEDULERS))}.")
    return SCHEDULERS[name].from_config(config)


def scheduler_from_pretrained(
    path_or_repo: str | os.PathLike[str],
    *,
    subfolder: str | None = None,
    revision: str | None = None,
) -> AbstractScheduler:
    """Load a ``scheduler_config.json`` (folder or Hub id) into the class it names."""
    pattern = f"{subfolder}/{CONFIG_NAME}" if subfolder else CONFIG_NAME
    folder = resolve_folder(path_or_repo, subfolder=subfolder, revision=revision, allow_patterns=[pattern])
    return scheduler_from_config(read_config(folder))


__all__ = ["SCHEDULERS", "scheduler_from_config", "scheduler_from_pretrained"]
