"""Quantizers: frozen settings per backend (torchao, optimum-quanto, GGUF, bitsandbytes, ModelOpt) and one verb.

>>> import torch
>>> from diffblocks.components.quantizers import TorchAoQuantizer, quantize, quantizer_of
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
>>> _ = quantize(model, TorchAoQuantizer("int8_weight_only"))
>>> quantizer_of(model)
TorchAoQuantizer(modules_to_not_convert=None, quant_type='int8wo')

Each backend's package is imported when a quantizer of it is used, never at import time. Reading
quantized files into our models lives with the models (``diffblocks.components.models.gguf``,
``diffblocks.components.models.quantized``); applying quantizers to a pipeline lives with the
pipeline (``diffblocks.blocks.quantizing``).
"""

from diffblocks.components.quantizers.base import (
    AbstractQuantizer,
    QuantizerNotInstalledError,
    UnsupportedQuantizationError,
    quantize,
    quantizer_of,
)
from diffblocks.components.quantizers.bitsandbytes import BitsAndBytesQuantizer
from diffblocks.components.quantizers.gguf import GGUFLinear, GGUFQuantizer
from diffblocks.components.quantizers.modelopt import ModelOptQuantizer
from diffblocks.components.quantizers.quanto import QuantoQuantizer
from diffblocks.components.quantizers.registry import (
    QUANTIZERS,
    quantizer_from_config,
    quantizer_from_diffusers,
    register_quantizer,
)
from diffblocks.components.quantizers.torchao import TorchAoQuantizer

__all__ = [
    "QUANTIZERS",
    "AbstractQuantizer",
    "BitsAndBytesQuantizer",
    "GGUFLinear",
    "GGUFQuantizer",
    "ModelOptQuantizer",
    "QuantizerNotInstalledError",
    "QuantoQuantizer",
    "TorchAoQuantizer",
    "UnsupportedQuantizationError",
    "quantize",
    "quantizer_from_config",
    "quantizer_from_diffusers",
    "quantizer_of",
    "register_quantizer",
]
