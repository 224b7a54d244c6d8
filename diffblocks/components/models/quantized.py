"""Read weights that were saved quantized (``quantization_config`` in ``config.json``) into a meta-built model.

The backend's own layout is its quantizer's business (:meth:`AbstractQuantizer.load_state`); this
module reads the files, checks what is left empty, and records the quantizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from diffblocks.components.models.buffers import materialize_computed_buffers, meta_tensor_names
from diffblocks.components.models.loading import CheckpointError
from diffblocks.components.quantizers.base import AbstractQuantizer, mark_quantized
from diffblocks.components.quantizers.registry import quantizer_from_diffusers

_MSG_OTHER = (
    "{where} holds weights already quantized with {saved}; they cannot be quantized again with {asked}. "
    "Load the folder without a quantizer, or quantize a folder of float weights."
)
_MSG_PICKLED = (
    "{path} holds quantized weights as a pickle; diffblocks reads quantized weights from safetensors only. "
    "Re-save them with safetensors (diffusers: save_pretrained(..., safe_serialization=True))."
)


def read_safetensors(files: Sequence[Path], device: torch.device) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor of ``files`` on ``device`` and their header metadata merged."""
    tensors: dict[str, Tensor] = {}
    metadata: dict[str, str] = {}
    for path in files:
        if path.suffix != ".safetensors":
            raise CheckpointError(_MSG_PICKLED.format(path=path))
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                metadata.update(f.metadata() or {})
                tensors.update({key: f.get_tensor(key) for key in f.keys()})
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read {path}: {err}. The file is truncated or corrupt.") from err
    return tensors, metadata


def load_quantized_weights(
    model: nn.Module,
    files: Sequence[Path],
    config: Mapping[str, Any],
    *,
    asked: AbstractQuantizer | None,
    device: torch.device | str,
    where: Path,
) -> AbstractQuantizer:
    """Fill the meta-built ``model`` from quantized ``files`` described by the ``quantization_config`` ``config``.

    Raises:
        ValueError: the config names an unknown backend, or ``asked`` is a different quantizer.
        QuantizerNotInstalledError, UnsupportedQuantizationError: before any file is read.
        CheckpointError: the files are pickled, unreadable, or leave parts of the model unfilled.
    """
    device = torch.device(device)
    saved = quantizer_from_diffusers(config)
    if asked is not None and asked != saved:
        raise ValueError(_MSG_OTHER.format(where=where, saved=saved.describe(), asked=asked.describe()))
    saved.check(device)
    tensors, metadata = read_safetensors(files, device)
    saved.load_state(model, tensors, metadata, device)
    materialize_computed_buffers(model, device=device)
    left = meta_tensor_names(model)
    if left:
        raise CheckpointError(
            f"{where.parent} does not fill {type(model).__name__} quantized with {saved.describe()}: "
            f"{', '.join(left[:10])}{' ...' if len(left) > 10 else ''} ({len(left)} tensors) stay empty"
        )
    mark_quantized(model, saved)
    return saved


__all__ = ["load_quantized_weights", "read_safetensors"]
