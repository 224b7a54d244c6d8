"""Blocks specific to Stable Diffusion 1.x/2.x and SDXL."""

from diffblocks.blocks.sd.encode import EncodePrompt

__all__ = ["EncodePrompt"]
