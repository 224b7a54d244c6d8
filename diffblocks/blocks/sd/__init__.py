"""Blocks specific to Stable Diffusion 1.x/2.x and SDXL."""

from diffblocks.blocks.sd.encode import EncodePrompt
from diffblocks.blocks.sd.encode_xl import EncodePromptXL
from diffblocks.blocks.sd.time_ids import PrepareTimeIds

__all__ = ["EncodePrompt", "EncodePromptXL", "PrepareTimeIds"]
