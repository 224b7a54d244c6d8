"""diffblocks: compose diffusion pipelines from small, typed, swappable blocks."""

__version__ = "0.1.0"
