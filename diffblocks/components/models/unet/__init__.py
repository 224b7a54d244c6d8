"""The Stable Diffusion / SDXL conditional UNet (diffusers ``UNet2DConditionModel`` compatible)."""

from diffblocks.components.models.unet.model import UNet2DConditionModel
from diffblocks.components.models.unet.params import UNet2DConditionParams

__all__ = ["UNet2DConditionModel", "UNet2DConditionParams"]
