"""Turn a :class:`ComponentSpec` into an object: our classes, transformers models and tokenizers."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from diffblocks.components.hub import resolve_folder
from diffblocks.components.memory.disk import MemoryMap
from diffblocks.components.specs import ComponentSpec
from diffblocks.components.transformers_mapped import load_transformers_mapped


def load_component(
    cls: type, spec: ComponentSpec, *, device: torch.device | str | None = None, memory_map: MemoryMap | None = None
) -> Any:
    """Create ``cls`` from ``spec``: from its config when the spec carries one and no repository,
    otherwise from the spec's repository folder (resolved through the Hub cache).

    A spec with ``quantization`` is quantized once loaded; the backend's package and the device
    are checked before anything is read. With ``memory_map``, a model whose ``from_pretrained``
    takes one loads straight into memory-mapped files (disk offload); others, and quantized specs,
    load into memory as usual.
    """
    if spec.quantization is None:
        return _load(cls, spec, device, **({"memory_map": memory_map} if memory_map is not None else {}))
    from diffblocks.components.quantizers import AbstractQuantizer, quantize

    quantizer = AbstractQuantizer.from_config(spec.quantization)
    quantizer.check(device)
    if spec.repo is not None and "quantizer" in inspect.signature(cls.from_pretrained).parameters:  # type: ignore[attr-defined]
        return _load(cls, spec, device, quantizer=quantizer)
    return quantize(_load(cls, spec, device), quantizer)


def _load(cls: type, spec: ComponentSpec, device: torch.device | str | None, **extra: Any) -> Any:
    if spec.repo is None:
        if spec.config is None:
            raise ValueError(f"component {spec.name!r} has neither a repository nor a config to build it from")
        check_random_weights(cls, spec)
        return cls.from_config(spec.config)  # type: ignore[attr-defined]
    if _is_transformers(cls):
        return _load_transformers(cls, spec, device, memory_map=extra.get("memory_map"))
    kwargs: dict[str, Any] = {"subfolder": spec.subfolder, "revision": spec.revision}
    accepted = inspect.signature(cls.from_pretrained).parameters  # type: ignore[attr-defined]
    if "memory_map" not in accepted:
        extra.pop("memory_map", None)  # read into memory; disk offload maps it from a file of its own once loaded
    if "variant" in accepted:
        kwargs["variant"] = spec.variant
    if "dtype" in accepted:
        kwargs["dtype"] = spec.torch_dtype
    if "device" in accepted and device is not None:
        kwargs["device"] = device
    return cls.from_pretrained(spec.repo, **kwargs, **extra)  # type: ignore[attr-defined]


_MSG_RANDOM = (
    "component {name!r} is a {cls} given only as a config: it would be built with random weights and draw noise. "
    "Give it a repository (repo=... in the ComponentSpec, pretrained_model_name_or_path in an index entry), "
    "or pass ComponentSpec(..., random_weights=True) if untrained weights are what you want"
)


def check_random_weights(cls: type, spec: ComponentSpec) -> None:
    """Refuse to build a model (a module with weights) from a config alone unless the spec asks for random weights.

    Schedulers and guiders are built from configs; a model built that way is untrained, which is
    never what loading a pipeline means, so it must be asked for.
    """
    if spec.repo is None and not spec.random_weights and isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        raise ValueError(_MSG_RANDOM.format(name=spec.name, cls=cls.__name__))


def _is_transformers(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "transformers"


def _load_transformers(cls: type, spec: ComponentSpec, device: torch.device | str | None, *, memory_map: MemoryMap | None = None) -> Any:
    # Resolve the folder ourselves so that Hub ids, revisions and offline mode behave as for every other component.
    assert spec.repo is not None
    folder = resolve_folder(spec.repo, subfolder=spec.subfolder, revision=spec.revision)
    from transformers import PreTrainedModel

    from diffblocks.components.quantizers.transformers_format import load_quantized_transformers, saved_quantization

    if issubclass(cls, PreTrainedModel) and saved_quantization(folder) is not None:
        # saved quantized (by diffblocks, transformers or diffusers): the backend's quantizer reads the tensors
        return load_quantized_transformers(cls, folder, variant=spec.variant, device=device)
    if issubclass(cls, PreTrainedModel) and memory_map is not None and device is None:
        _has_safetensors(folder, spec.variant)
        return load_transformers_mapped(cls, folder, variant=spec.variant, dtype=spec.torch_dtype, memory_map=memory_map)
    if issubclass(cls, PreTrainedModel):
        kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": _has_safetensors(folder, spec.variant)}
        if spec.variant:
            kwargs["variant"] = spec.variant
        if spec.torch_dtype is not None:
            kwargs["dtype"] = spec.torch_dtype
        model = cls.from_pretrained(folder, **kwargs)
        model.eval()
        return model.to(device) if device is not None else model
    return cls.from_pretrained(folder, local_files_only=True)  # type: ignore[attr-defined]


def _has_safetensors(folder: Any, variant: str | None) -> bool:
    # transformers names variants "model.fp16.safetensors", "model.fp16-00001-of-00002.safetensors" and
    # "model.safetensors.index.fp16.json"; any safetensors file or index carrying the variant will do
    names = [p.name for p in folder.iterdir() if ".safetensors" in p.name]
    found = any(f".{variant}" in name for name in names) if variant else bool(names)
    if not found:
        raise FileNotFoundError(
            f"{folder} has no safetensors weights{f' for variant {variant!r}' if variant else ''}; "
            "diffblocks loads text encoders from safetensors only. Convert the checkpoint "
            "(transformers: model.save_pretrained(folder, safe_serialization=True))."
        )
    return True
