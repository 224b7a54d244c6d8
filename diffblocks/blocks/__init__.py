"""Blocks: the typed steps, their composites, the checked plan and the executor."""

from diffblocks.blocks.block import AbstractBlock, Block, BlockConfig, BlockIO, ComponentDecl, NoIO, component, known
from diffblocks.blocks.composites import Branch, Loop, Sequence, Switch
from diffblocks.blocks.errors import FieldError, InputError, PlanError, Problem
from diffblocks.blocks.executor import StepInfo
from diffblocks.blocks.fields import produced
from diffblocks.blocks.introspect import block_doc
from diffblocks.blocks.output import PipelineOutput
from diffblocks.blocks.pipeline import Pipeline, PresetInfo
from diffblocks.blocks.tree import Node, walk
from diffblocks.blocks.types import Bool, Float, Int, Shaped, TensorSpec

__all__ = [
    "AbstractBlock",
    "Block",
    "BlockConfig",
    "BlockIO",
    "Bool",
    "Branch",
    "ComponentDecl",
    "FieldError",
    "Float",
    "InputError",
    "Int",
    "Loop",
    "NoIO",
    "Node",
    "Pipeline",
    "PipelineOutput",
    "PlanError",
    "PresetInfo",
    "Problem",
    "Sequence",
    "Shaped",
    "StepInfo",
    "Switch",
    "TensorSpec",
    "block_doc",
    "component",
    "produced",
    "walk",
    "known",
]
