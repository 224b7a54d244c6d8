"""ControlNet for the UNet families (diffusers ``ControlNetModel`` compatible)."""

from diffblocks.components.models.controlnet.model import ControlNetConditioningEmbedding, ControlNetModel
from diffblocks.components.models.controlnet.multi import MultiControlNetModel, controlnets
from diffblocks.components.models.controlnet.params import ControlNetParams

__all__ = ["ControlNetConditioningEmbedding", "ControlNetModel", "ControlNetParams", "MultiControlNetModel", "controlnets"]
