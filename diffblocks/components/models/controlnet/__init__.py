"""ControlNets: for the UNet families (diffusers ``ControlNetModel``) and for Flux (``FluxControlNetModel``)."""

from diffblocks.components.models.controlnet.flux import (
    FluxControlNetModel,
    FluxControlNetOutput,
    FluxControlNetParams,
    FluxMultiControlNetModel,
    flux_block_residuals,
    flux_controlnets,
)
from diffblocks.components.models.controlnet.model import ControlNetConditioningEmbedding, ControlNetModel
from diffblocks.components.models.controlnet.multi import MultiControlNetModel, MultiControlNetUnionModel, controlnets
from diffblocks.components.models.controlnet.params import AbstractControlNetParams, ControlNetParams, ControlNetUnionParams
from diffblocks.components.models.controlnet.union import ControlNetUnionModel

__all__ = [
    "AbstractControlNetParams",
    "ControlNetConditioningEmbedding",
    "ControlNetModel",
    "ControlNetParams",
    "ControlNetUnionModel",
    "ControlNetUnionParams",
    "FluxControlNetModel",
    "FluxControlNetOutput",
    "FluxControlNetParams",
    "FluxMultiControlNetModel",
    "MultiControlNetModel",
    "MultiControlNetUnionModel",
    "controlnets",
    "flux_block_residuals",
    "flux_controlnets",
]
