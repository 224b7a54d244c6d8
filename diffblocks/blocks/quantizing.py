"""Which components a pipeline's ``quantization`` argument names, and what replaces each.

A component loaded from a spec is re-quantized by reloading: its spec gains the quantizer, so the
manager reads the original weights again. A component given as an object is quantized as a copy,
and the float original is kept beside the pipeline so that the next swap starts from it again.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import nn

from diffblocks.blocks.textual_inversion import ENCODER_TOKENIZERS, sources_of
from diffblocks.components.compiled import unwrap_compiled
from diffblocks.components.lora import adapter_names
from diffblocks.components.manager import ComponentsManager
from diffblocks.components.quantizers.base import AbstractQuantizer, quantize, quantizer_of

DEFAULT_QUANTIZED = ("unet", "transformer", "text_encoder", "text_encoder_2")
"""What one quantizer for a whole pipeline quantizes: the denoiser and the text encoders, where present."""

Quantization = AbstractQuantizer | Mapping[str, AbstractQuantizer | None] | None

_MSG_NO_WEIGHTS = (
    "component {name!r} is a {cls}, which holds no weights to quantize; quantize one of: {models}."
)
_MSG_FROM_FILE = (
    "{quantizer} cannot quantize component {name!r}: GGUF weights come quantized in .gguf files. Load the file "
    "with load_gguf(...) and pass the model as components={{{name!r}: model}}."
)
_MSG_HELD = (
    "component {name!r} holds the {what}(s) {held}, which live in the module that quantizing replaces: the new one "
    "would come without them{why}. Remove them ({remove}), quantize, then load them again."
)
_MSG_GIVEN_QUANTIZED = (
    "component {name!r} was given already quantized ({done}); the pipeline has no original weights to "
    "quantize again. Give the float model instead."
)


def requested(quantization: Quantization, names: Mapping[str, Any]) -> dict[str, AbstractQuantizer | None]:
    """``quantization`` per component name (one quantizer means :data:`DEFAULT_QUANTIZED`).

    Raises:
        ValueError: a name that is not a component of the pipeline.
    """
    if quantization is None:
        return {}
    if isinstance(quantization, AbstractQuantizer):
        return {name: quantization for name in DEFAULT_QUANTIZED if name in names}
    unknown = [name for name in quantization if name not in names]
    if unknown:
        raise ValueError(f"quantization names {', '.join(map(repr, unknown))}, not components of the pipeline: {', '.join(names)}.")
    return dict(quantization)


def replacements(
    manager: ComponentsManager,
    keys: Mapping[str, str],
    quantization: Quantization,
    *,
    originals: MutableMapping[str, Any],
) -> dict[str, Any]:
    """The spec or object that replaces each component ``quantization`` names (None removes a quantizer).

    Everything is checked before anything loads: each named component holds weights (its class is
    resolved without loading it), each backend is installed and runs on the manager's device.

    Raises:
        ValueError: a component without weights, or one given quantized, or GGUF asked to quantize floats,
            or a loaded one holding LoRA adapters or textual inversion tokens (the new module would lack them).
        QuantizerNotInstalledError, UnsupportedQuantizationError: as :meth:`AbstractQuantizer.check`.
    """
    wanted = requested(quantization, keys)
    models = [n for n, k in keys.items() if _holds_weights(manager, k)]
    for name, quantizer in wanted.items():
        if not _holds_weights(manager, keys[name]):
            cls = manager.component_type(keys[name]) or type(manager.get(keys[name]))
            raise ValueError(_MSG_NO_WEIGHTS.format(name=name, cls=cls.__name__, models=", ".join(models) or "none"))
        if quantizer is not None and not quantizer.quantizes_float_weights:
            raise ValueError(_MSG_FROM_FILE.format(quantizer=quantizer.describe(), name=name))
        if quantizer is not None:
            quantizer.check(manager.device)
        _check_holds_nothing(manager, keys, name)
    changes: dict[str, Any] = {}
    for name, quantizer in wanted.items():
        key = keys[name]
        spec = manager.spec(key)
        if spec is not None:
            changes[name] = spec.with_(quantization=quantizer.to_config() if quantizer is not None else None)
            continue
        current = manager.get(key)
        original = originals.get(name, current)
        if name not in originals and quantizer_of(original) is not None:
            raise ValueError(_MSG_GIVEN_QUANTIZED.format(name=name, done=quantizer_of(original).describe()))  # type: ignore[union-attr]
        originals[name] = original
        changes[name] = original if quantizer is None else quantize(copy.deepcopy(original), quantizer)
    return changes


def _check_holds_nothing(manager: ComponentsManager, keys: Mapping[str, str], name: str) -> None:
    """Refuse to replace a loaded model that holds LoRA adapters or textual inversion rows (they would be lost)."""
    loaded = manager.loaded(keys[name])
    model = unwrap_compiled(loaded) if loaded is not None else None
    if not isinstance(model, nn.Module):
        return  # not loaded yet: nothing is attached to it
    adapters = adapter_names(model)
    if adapters:
        raise ValueError(
            _MSG_HELD.format(name=name, what="LoRA adapter", held=adapters, why="", remove=f"pipe.delete_adapters({adapters!r})")
        )
    tokenizer_name = ENCODER_TOKENIZERS.get(name)
    tokenizer = manager.loaded(keys[tokenizer_name]) if tokenizer_name is not None and tokenizer_name in keys else None
    tokens = list(sources_of(model, tokenizer)) if tokenizer is not None else []
    if tokens:
        why = f", while {tokenizer_name} keeps their ids, so a prompt naming them would fail"
        raise ValueError(
            _MSG_HELD.format(
                name=name, what="textual inversion token", held=tokens, why=why, remove=f"pipe.unload_textual_inversion({tokens!r})"
            )
        )


def _holds_weights(manager: ComponentsManager, key: str) -> bool:
    cls = manager.component_type(key)
    if cls is None:
        cls = type(manager.get(key))
    return isinstance(cls, type) and issubclass(cls, nn.Module) and cls is not torch.nn.Identity


__all__ = ["DEFAULT_QUANTIZED", "Quantization", "replacements", "requested"]
