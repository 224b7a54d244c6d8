"""Single-file checkpoints in their original key layouts: LDM (SD 1.x/2.x), SGM (SDXL), BFL (Flux.1), ControlNet.

Each layout is one module holding its tables (our key -> where the file stores it, as data) and
the parts its files may hold; :mod:`.rules` says how a tensor is taken, and :mod:`.reading` opens
files (local, or a Hub file through the cache; safetensors first).
"""

from diffblocks.components.models.single_file.bfl import BFL
from diffblocks.components.models.single_file.controlnet import CONTROL
from diffblocks.components.models.single_file.layout import Layout, Part
from diffblocks.components.models.single_file.ldm import LDM
from diffblocks.components.models.single_file.loading import LAYOUTS, load_model, load_transformers_model
from diffblocks.components.models.single_file.reading import SingleFile, resolve_file
from diffblocks.components.models.single_file.rules import Reshaped, Rows, Swapped, Take, Transposed, to_original
from diffblocks.components.models.single_file.sgm import SGM

__all__ = [
    "BFL",
    "CONTROL",
    "LAYOUTS",
    "LDM",
    "SGM",
    "Layout",
    "Part",
    "Reshaped",
    "Rows",
    "SingleFile",
    "Swapped",
    "Take",
    "Transposed",
    "load_model",
    "load_transformers_model",
    "resolve_file",
    "to_original",
]
