"""Quantized transformers text encoders (CLIP, T5) saved and read in transformers' own layout.

A pipeline's ``text_encoder`` and ``text_encoder_2`` are transformers models; quantized by one of
our quantizers, they are saved the way transformers (and so diffusers' ``PipelineQuantizationConfig``)
saves them: ``config.json`` with the ``quantization_config`` transformers writes for the backend,
and ``model.safetensors`` holding the quantized tensors as the backend stores them (the same
tensors our own models save). Tied weights (T5's ``encoder.embed_tokens`` and ``shared``) are
stored once, as transformers does.

| backend | ``quantization_config`` | transformers reads the folder |
|---|---|---|
| torchao | ``TorchAoConfig(<torchao config>).to_dict()`` | yes (torchao >= 0.16, safetensors) |
| bitsandbytes | ``BitsAndBytesConfig(...).to_dict()`` | CLIP, where bitsandbytes runs; not T5 (transformers keeps its ``wo`` unquantized) |
| optimum-quanto | ``QuantoConfig(weights=...).to_dict()`` | no: transformers cannot save or read quantized quanto weights (``is_serializable`` is False), so the tensors are quanto's safetensors layout, read by diffblocks only |

ModelOpt and GGUF text encoders are not saved (transformers has no ModelOpt text encoders to match,
and GGUF weights stay in their ``.gguf`` file).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from diffblocks.components.quantizers.base import AbstractQuantizer, mark_quantized, quantizer_of
from diffblocks.components.quantizers.bitsandbytes import BitsAndBytesQuantizer
from diffblocks.components.quantizers.quanto import QuantoQuantizer
from diffblocks.components.quantizers.registry import quantizer_from_diffusers
from diffblocks.components.quantizers.torchao import TorchAoQuantizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

WEIGHTS_NAME = "model.safetensors"
SAVED_BACKENDS = (TorchAoQuantizer, BitsAndBytesQuantizer, QuantoQuantizer)
"""The quantizers whose transformers models are saved (the others are refused by name)."""

_MSG_NOT_SAVED = (
    "{model} is quantized with {quantizer}, which diffblocks does not save for transformers models (it saves "
    "torchao, bitsandbytes and quanto text encoders). Save the pipeline with that component unquantized "
    "(pipe.quantize({{{name!r}: None}})) and quantize it again after loading."
)
_MSG_ACTIVATIONS = (
    "{quantizer} quantizes activations, which transformers' QuantoConfig cannot record when saved; save a "
    "quantizer without activations, or keep the float weights and quantize after loading."
)


def transformers_quantization_config(quantizer: AbstractQuantizer) -> dict[str, Any]:
    """The ``quantization_config`` transformers writes into a text encoder's ``config.json`` for ``quantizer``.

    Built by transformers' own config classes, so the keys are transformers' for the installed version.

    Raises:
        ValueError: the backend is not saved for transformers models, or quanto activations are set.
    """
    import transformers

    skipped = list(quantizer.modules_to_not_convert) if quantizer.modules_to_not_convert else None
    if isinstance(quantizer, TorchAoQuantizer):
        return transformers.TorchAoConfig(quantizer.torchao_config(), modules_to_not_convert=skipped).to_dict()
    if isinstance(quantizer, QuantoQuantizer):
        if quantizer.activations is not None:
            raise ValueError(_MSG_ACTIVATIONS.format(quantizer=quantizer.describe()))
        return transformers.QuantoConfig(weights=quantizer.weights, modules_to_not_convert=skipped).to_dict()
    if isinstance(quantizer, BitsAndBytesQuantizer):
        # diffusers' bitsandbytes config is a copy of transformers': the same keys, built by transformers here
        ours = quantizer.to_diffusers()
        kwargs = {k: v for k, v in ours.items() if not k.startswith("_") and k != "quant_method"}
        return transformers.BitsAndBytesConfig(**kwargs).to_dict()
    raise ValueError(f"transformers models quantized with {quantizer.describe()} are not saved by diffblocks")


def quantizer_from_transformers(config: Mapping[str, Any]) -> AbstractQuantizer:
    """The quantizer a transformers ``quantization_config`` describes (the inverse of :func:`transformers_quantization_config`).

    Raises:
        ValueError: the backend is not one diffblocks reads, or a quanto config quantizes activations.
    """
    if config.get("quant_method") == QuantoQuantizer.quant_method:  # transformers says "weights", diffusers "weights_dtype"
        if config.get("activations") is not None:
            raise ValueError(f"a quanto quantization_config with activations {config['activations']!r}: diffblocks reads weights only")
        skipped = config.get("modules_to_not_convert")
        return QuantoQuantizer(str(config.get("weights")), modules_to_not_convert=tuple(skipped) if skipped else None)
    return quantizer_from_diffusers(config)


def save_quantized_transformers(
    model: PreTrainedModel, folder: str | os.PathLike[str], *, name: str = "text_encoder", variant: str | None = None
) -> Path:
    """Write a quantized transformers ``model`` as transformers does: ``config.json`` and ``model.safetensors``.

    Args:
        model: a transformers model that :func:`~diffblocks.components.quantizers.quantize` quantized.
        folder: created if missing.
        name: the component's name, for the error message.
        variant: ``"fp16"`` writes ``model.fp16.safetensors``. The weights are one file (not sharded).

    Raises:
        ValueError: ``model`` is not quantized, or its backend is not saved (the message says what to do).
    """
    from safetensors.torch import save_file

    quantizer = quantizer_of(model)
    if quantizer is None:
        raise ValueError(f"{type(model).__name__} is not quantized; save it with its own save_pretrained")
    if not isinstance(quantizer, SAVED_BACKENDS):
        raise ValueError(_MSG_NOT_SAVED.format(model=type(model).__name__, quantizer=quantizer.describe(), name=name))
    quantization_config = transformers_quantization_config(quantizer)
    tensors, metadata = quantizer.state_to_save(model)
    tensors, metadata = _without_tied(model, tensors, metadata)
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.quantization_config = quantization_config
    config.save_pretrained(path)
    stem, _, suffix = WEIGHTS_NAME.partition(".")
    file = path / (f"{stem}.{variant}.{suffix}" if variant else WEIGHTS_NAME)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file), metadata={**metadata, "format": "pt"})
    return path


def saved_quantization(folder: str | os.PathLike[str]) -> Mapping[str, Any] | None:
    """The ``quantization_config`` in a transformers model folder's ``config.json``, or None."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    found = config.get("quantization_config") if isinstance(config, dict) else None
    return found if isinstance(found, Mapping) else None


def load_quantized_transformers(
    cls: type[PreTrainedModel], folder: str | os.PathLike[str], *, variant: str | None = None, device: torch.device | str | None = None
) -> PreTrainedModel:
    """Read a transformers model folder saved quantized (by diffblocks, or by transformers and diffusers).

    The model is built on the meta device from ``config.json`` (without its ``quantization_config``),
    and the backend's quantizer fills it from the safetensors files, as for our own models.

    Raises:
        FileNotFoundError: the folder has no safetensors weights (pickled folders are not read).
        ValueError: the ``quantization_config`` names a backend diffblocks does not read.
        QuantizerNotInstalledError, UnsupportedQuantizationError: before any weight is read.
        ValueError: the files are truncated or corrupt, or leave parts of the model empty (named).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    path = Path(folder)
    saved = saved_quantization(path)
    if saved is None:
        raise ValueError(f"{path}/config.json has no quantization_config; load the folder with {cls.__name__}.from_pretrained")
    quantizer = quantizer_from_transformers(saved)
    device = torch.device(device if device is not None else "cpu")
    quantizer.check(device)
    files = _weight_files(path, variant)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the model is built plain; the quantizer lays out its weights
    with init_empty_weights(include_buffers=False):  # computed buffers (CLIP's position_ids) are built for real
        model = cls(config)
    tensors, metadata = _read_safetensors(files, device)
    quantizer.load_state(model, tensors, metadata, device)
    model.tie_weights()
    for module in model.modules():
        for child, buffer in module.named_buffers(recurse=False):
            setattr(module, child, buffer.to(device))
    left = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if left:
        raise ValueError(
            f"{path} does not fill {cls.__name__} quantized with {quantizer.describe()}: {', '.join(left[:10])} "
            f"({len(left)} tensors) stay empty"
        )
    mark_quantized(model, quantizer)
    return model.eval()


def _read_safetensors(files: list[Path], device: torch.device) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor of ``files`` on ``device``, and their header metadata merged."""
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, Tensor] = {}
    metadata: dict[str, str] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                metadata.update(f.metadata() or {})
                tensors.update({key: f.get_tensor(key) for key in f.keys()})
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read {path}: {err}. The file is truncated or corrupt.") from err
    return tensors, metadata


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    infix = f".{variant}" if variant else ""
    single = folder / f"model{infix}.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(folder.glob(f"model{infix}-*-of-*.safetensors"))
    if shards:
        return shards
    raise FileNotFoundError(
        f"{folder} has no safetensors weights{f' for variant {variant!r}' if variant else ''}; diffblocks reads "
        "quantized text encoders from safetensors only (transformers: save_pretrained(..., safe_serialization=True))."
    )


def _without_tied(model: nn.Module, tensors: dict[str, Tensor], metadata: dict[str, str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``tensors`` with each tied weight stored once, under the first name (transformers ties them again on load)."""
    seen: dict[int, str] = {}
    tied: list[str] = []
    for name, parameter in model.state_dict(keep_vars=True).items():
        key = id(parameter)
        if key in seen and name in tensors:
            tied.append(name)
        seen.setdefault(key, name)
    if not tied:
        return tensors, metadata
    kept = {k: v for k, v in tensors.items() if k not in tied}
    metadata = {k: v for k, v in metadata.items() if k not in tied}
    if "tensor_names" in metadata:  # torchao's list of the state dict's names
        metadata["tensor_names"] = json.dumps([n for n in json.loads(metadata["tensor_names"]) if n not in tied])
    return kept, metadata


__all__ = [
    "SAVED_BACKENDS",
    "WEIGHTS_NAME",
    "load_quantized_transformers",
    "quantizer_from_transformers",
    "save_quantized_transformers",
    "saved_quantization",
    "transformers_quantization_config",
]
