"""LoRAs saved with a preset: a pinned, hashed reference per adapter, applied again when the preset loads.

``save_pretrained`` records every adapter attached to the denoiser or a text encoder in the modular index, under
``_diffblocks_loras``::

    [{"adapter_name": "style", "weight": 0.7, "fused": false,
      "file": "loras/style.safetensors", "sha256": "9f2c...", "repo": null, "revision": null},
     {"adapter_name": "ink", "weight": 0.4, "fused": false,
      "file": "ink.safetensors", "sha256": "51d0...", "repo": "someone/ink-lora", "revision": "<40 hex digits>"}]

A LoRA read from a local file is copied into the saved folder (``loras/``), so that the folder
stands on its own and ``push_to_hub`` uploads it; one read from the Hub stays a reference to its
repository at the commit it was read from. Loading resolves every file inside the repository
that names it (:mod:`diffblocks.components.containment`), checks its sha256 before reading a
tensor (a mismatch is an error naming the file), attaches the adapters under their names, sets
their weights, and fuses them if they were fused: the same image as the pipeline saved. Files are
pinned and checked as :mod:`diffblocks.presets.pinned` does for every file a preset names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from diffblocks.blocks import Pipeline
from diffblocks.blocks.lora import TEXT_ENCODER_NAMES, lora_parts
from diffblocks.components.compiled import unwrap_compiled
from diffblocks.components.lora import LoRALayer, LoRASource, adapter_weights, check_injectable, inject, is_fused, read_lora_file, source_of
from diffblocks.components.lora.text_encoders import DENOISER
from diffblocks.components.models.compile import DENOISER_NAMES
from diffblocks.presets.pinned import pin, resolve_pinned

LORAS_KEY = "_diffblocks_loras"
LORA_FOLDER = "loras"

_MSG_NO_SOURCE = (
    "LoRA {name!r} on the {model} was attached from tensors, not read from a file, so a saved preset cannot "
    "record it. Save it as a .safetensors file and attach it with pipe.load_lora_weights(path, adapter_name={name!r}), "
    "or remove it (pipe.delete_adapters({name!r})) before saving."
)
_MSG_PICKLE = (
    "LoRA {name!r} was read from the pickle {file}; a saved preset holds safetensors files only. Convert it "
    "(safetensors.torch.save_file(torch.load(path, weights_only=True), 'lora.safetensors')) and load that instead."
)
_MSG_DISABLED = (
    "the LoRA adapters of the {model} are disabled (pipe.disable_lora()), but a saved preset attaches them enabled "
    "when it loads, which would make other images. Enable them (pipe.enable_lora()) or remove them "
    "(pipe.unload_lora_weights()) before saving."
)
_MSG_BAD_ENTRY = "{repository}: the modular index's {key} is not a list of LoRA references ({err}); nothing was loaded."


class LoRAReference(BaseModel):
    """One adapter of a saved preset: its file (in the preset's repository, or in ``repo`` at ``revision``), weight and state.

    Args:
        adapter_name: the name it is attached under.
        weight: its weight (``set_adapters``).
        fused: whether the adapters were fused into the denoiser's weights.
        file: a path inside the preset's folder (``repo`` None), or inside ``repo``.
        sha256: the file's hash, checked before it is read.
        repo: a Hub repository id, for a LoRA kept as a reference.
        revision: the commit of ``repo`` the file was read at.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    adapter_name: str = Field(min_length=1)
    weight: float
    fused: bool = False
    file: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    repo: str | None = None
    revision: str | None = Field(default=None, pattern=r"^[0-9a-f]{40}$")


def lora_models(pipe: Pipeline, *, load: bool = False) -> dict[str, nn.Module]:
    """The modules LoRAs attach to (the denoiser, keyed :data:`DENOISER`, and the text encoders), loaded ones only
    unless ``load``: a model that is not loaded has no adapters, they live in the loaded module.
    """
    keys = pipe.component_keys()
    models: dict[str, nn.Module] = {}
    for name in (*DENOISER_NAMES, *TEXT_ENCODER_NAMES):
        if name in keys and (load or pipe.manager.is_loaded(keys[name])):
            model = unwrap_compiled(pipe.manager.get(keys[name]))
            if isinstance(model, nn.Module):
                models[DENOISER if name in DENOISER_NAMES else name] = model
    return models


def lora_references(pipe: Pipeline) -> tuple[list[LoRAReference], dict[str, Path]]:
    """The references to record for ``pipe``'s adapters, and the local files to copy (saved path -> file).

    An adapter attached to several models (a file with denoiser and text-encoder parts) is one reference.

    Raises:
        ValueError: an adapter has no file, was read from a pickle, or its file changed since (named), or the
            adapters are disabled (a preset loads them enabled).
    """
    models = lora_models(pipe)
    fused = any(is_fused(model) for model in models.values())
    references: list[LoRAReference] = []
    copies: dict[str, Path] = {}
    seen: set[str] = set()
    for model in models.values():
        if any(isinstance(layer, LoRALayer) and not layer.enabled for layer in model.modules()):
            raise ValueError(_MSG_DISABLED.format(model=type(model).__name__))
        for name, weight in adapter_weights(model).items():
            if name in seen:
                continue
            seen.add(name)
            source = source_of(model, name)
            if source is None:
                raise ValueError(_MSG_NO_SOURCE.format(name=name, model=type(model).__name__))
            pinned, local = pin(
                source, name=name, folder=LORA_FOLDER, kind="LoRA", where="the attached adapter",
                pickle_error=_MSG_PICKLE.format(name=name, file=Path(source.file)),
            )
            if local is not None:
                copies[pinned.file] = local
            references.append(
                LoRAReference(
                    adapter_name=name, weight=weight, fused=fused, file=pinned.file, sha256=pinned.sha256,
                    repo=pinned.repo, revision=pinned.revision,
                )
            )
    return references, copies


def apply_loras(pipe: Pipeline, entry: Any, path_or_repo: str | os.PathLike[str], *, revision: str | None = None) -> None:
    """Attach the adapters a saved preset records (``entry``, its ``_diffblocks_loras``), as they were saved.

    Every file is found and checked before any adapter is attached, so a bad entry changes nothing.

    Raises:
        ValueError: the entry is malformed, or a file's sha256 differs from the recorded one (named).
        RepositoryPathError: a file leads out of its repository, or ``repo`` is not a Hub id.
    """
    repository = str(path_or_repo)
    try:
        references = [LoRAReference.model_validate(item) for item in entry]
    except (TypeError, ValidationError) as err:
        raise ValueError(_MSG_BAD_ENTRY.format(repository=repository, key=LORAS_KEY, err=err)) from None
    names = [reference.adapter_name for reference in references]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:  # the second would fail to attach after the first had changed the models
        raise ValueError(_MSG_BAD_ENTRY.format(repository=repository, key=LORAS_KEY, err=f"adapter {twice!r} is given twice"))
    if not references:
        return
    files = [_resolve(reference, path_or_repo, revision=revision) for reference in references]
    models = lora_models(pipe, load=True)
    if DENOISER not in models:
        raise ValueError(f"{repository}: its index records LoRAs, but the pipeline has no {' or '.join(DENOISER_NAMES)}")
    parts = [
        lora_parts(read_lora_file(path), models, reference.adapter_name, source)
        for reference, (path, source) in zip(references, files, strict=True)
    ]
    for loras in parts:  # every model checked before any changes
        for component, lora in loras.items():
            check_injectable(models[component], lora)
    for loras in parts:
        for component, lora in loras.items():
            inject(models[component], lora)
    pipe.set_adapters([r.adapter_name for r in references], [r.weight for r in references])
    if any(reference.fused for reference in references):
        pipe.fuse_lora()


def _resolve(reference: LoRAReference, path_or_repo: str | os.PathLike[str], *, revision: str | None) -> tuple[Path, LoRASource]:
    """The reference's file, inside the repository that holds it, its hash checked."""
    return resolve_pinned(
        path_or_repo, reference.file, reference.sha256, reference.repo, reference.revision,
        revision=revision, key=LORAS_KEY, name=reference.adapter_name, kind="LoRA",
    )


__all__ = [
    "LORAS_KEY",
    "LORA_FOLDER",
    "LoRAReference",
    "apply_loras",
    "lora_models",
    "lora_references",
    "resolve_pinned",
]
