"""Schedulers: one sampling algorithm per file, each configured by diffusers' ``scheduler_config.json``.

A scheduler is a frozen config shared freely; :meth:`AbstractScheduler.set_timesteps` returns the
:class:`SchedulerState` of one run, which ``scale_model_input``, ``step`` and ``add_noise`` take.
"""

from diffblocks.components.schedulers.base import CONFIG_NAME, AbstractScheduler
from diffblocks.components.schedulers.ddim import DDIMScheduler
from diffblocks.components.schedulers.ddpm import DDPMScheduler
from diffblocks.components.schedulers.dpm_solver import DPMSolverMultistepScheduler
from diffblocks.components.schedulers.dpm_solver_sde import DPMSolverSDEScheduler
from diffblocks.components.schedulers.euler import EulerDiscreteScheduler
from diffblocks.components.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from diffblocks.components.schedulers.flow_match import FlowMatchEulerDiscreteScheduler, flux_sigmas
from diffblocks.components.schedulers.flow_match_heun import FlowMatchHeunDiscreteScheduler
from diffblocks.components.schedulers.heun import HeunDiscreteScheduler
from diffblocks.components.schedulers.lcm import LCMScheduler
from diffblocks.components.schedulers.lms import LMSDiscreteScheduler
from diffblocks.components.schedulers.pndm import PNDMScheduler
from diffblocks.components.schedulers.registry import SCHEDULERS, scheduler_from_config, scheduler_from_pretrained
from diffblocks.components.schedulers.state import SchedulerState, StepRecord, flow_strength_begin, strength_begin
from diffblocks.components.schedulers.tcd import TCDScheduler
from diffblocks.components.schedulers.unipc import UniPCMultistepScheduler

__all__ = [
    "CONFIG_NAME",
    "SCHEDULERS",
    "AbstractScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSDEScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LCMScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "SchedulerState",
    "StepRecord",
    "TCDScheduler",
    "UniPCMultistepScheduler",
    "flow_strength_begin",
    "flux_sigmas",
    "scheduler_from_config",
    "scheduler_from_pretrained",
    "strength_begin",
]
