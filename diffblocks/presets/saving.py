"""Save a preset pipeline to a folder: one subfolder per component, both index files, written atomically.

The folder holds ``modular_model_index.json`` (read first by :func:`~diffblocks.presets.from_pretrained`:
type hints, dtypes, variants, the guider, the family and the settings) and a classic
``model_index.json`` that diffusers' own pipelines read. Which components are copied:

* objects (given or loaded) and specs of local folders are saved into ``<folder>/<name>``;
* specs of Hub repositories that are still a reference (``ComponentSpec(repo="org/model", ...)``)
  stay references in the modular index, with their revision, variant and dtype: the saved folder
  is small and loads them from their own repository. ``copy_references=True`` copies them too.

A pipeline whose block tree was edited (see :mod:`diffblocks.presets.structure`) also saves its
tree, and the modules of its user-written blocks with their sha256 (:mod:`diffblocks.presets.treefile`).

Everything is written into a hidden folder beside the target, and only then moved in: only the
files a save writes replace the previous save's, and other files in the folder stay (see
:mod:`diffblocks.presets.staging`). A failure leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffblocks.blocks import Pipeline
from diffblocks.blocks.pipeline import PresetInfo
from diffblocks.components import ComponentsManager, ComponentSpec, write_modular_index
from diffblocks.components.compiled import unwrap_compiled
from diffblocks.components.containment import is_hub_id
from diffblocks.components.guiders import AbstractGuider
from diffblocks.components.lora import detached
from diffblocks.components.models import AbstractModel
from diffblocks.components.models.controlnet.multi import AbstractMultiControlNet
from diffblocks.components.quantizers import AbstractQuantizer, quantizer_of
from diffblocks.components.schedulers import AbstractScheduler
from diffblocks.components.specs import CLASSIC_INDEX, MODULAR_INDEX
from diffblocks.presets.embeddings import EMBEDDINGS_KEY, detached_embeddings, embedding_references
from diffblocks.presets.families import FAMILIES
from diffblocks.presets.ip_adapters import IP_ADAPTER_KEY, HeldIPAdapter, ip_adapter_detached, write_ip_adapter
from diffblocks.presets.loras import LORAS_KEY, lora_models, lora_references
from diffblocks.presets.pinned import copy_pinned
from diffblocks.presets.staging import MANIFEST_KEY, saved_files, staged_save
from diffblocks.presets.structure import edited, preset_of
from diffblocks.presets.treefile import CODE_KEY, TREE_KEY, tree_to_json
from diffblocks.registry import BLOCKS, Registry, RegistryError

_MSG_EXISTS = (
    "{folder} exists, is not empty and is not a saved diffblocks pipeline; saving would replace everything "
    "in it. Pass overwrite=True to replace it, or choose an empty or new folder."
)
_MSG_UNSAFE = (
    "safe_serialization=False is not supported: diffblocks writes safetensors only, because pickled "
    "weights can run code when they are loaded."
)
_MSG_UNSAVABLE = (
    "component {name!r} is a {cls}, which diffblocks cannot save: it saves its models (AbstractModel), "
    "transformers models and tokenizers, schedulers and guiders."
)
_MSG_QUANTIZED_FOREIGN = (
    "component {name!r} ({cls}) is quantized with {quantizer}, whose weights diffblocks saves for its own models only "
    "(transformers text encoders are saved quantized with torchao, bitsandbytes or quanto). Save the pipeline with "
    "that component unquantized (pipe.quantize({{{name!r}: None}})) and quantize it again after loading, or keep it "
    "a reference to its repository."
)
_CLASSIC_LIBRARIES = frozenset({"diffusers", "transformers"})
_OUR_SETTINGS = frozenset({"family", TREE_KEY, CODE_KEY})  # settings only diffblocks reads: kept out of diffusers' index


@dataclass(frozen=True)
class _Item:
    """One component to save: copied into its subfolder, or written as the reference ``spec``."""

    name: str
    key: str
    cls: type
    type_hint: tuple[str, str]
    reference: ComponentSpec | None


def save_pretrained(
    pipe: Pipeline,
    folder: str | os.PathLike[str],
    *,
    variant: str | None = None,
    max_shard_size: int | str | None = None,
    safe_serialization: bool = True,
    overwrite: bool = False,
    copy_references: bool = False,
) -> Path:
    """Save ``pipe``'s components, guider and settings so that ``Pipeline.from_pretrained(folder)`` rebuilds it.

    A pipeline whose blocks differ from its family's saves its block tree too: registered blocks by
    name, user-written blocks with their module file (``blocks/<module path>.py``), whose sha256 the
    index records. Loading such code needs ``trust_remote_code=True``.

    The LoRAs attached to the denoiser are recorded under ``_diffblocks_loras`` (a local file copied
    into ``loras/``, a Hub file pinned to its commit, each with its sha256, weight and fused state;
    see :mod:`diffblocks.presets.loras`), and the denoiser's own weights are saved without them. The
    textual inversion embeddings are recorded alike under ``_diffblocks_textual_inversions``
    (:mod:`diffblocks.presets.embeddings`), the tokenizers and text encoders saved without them. An
    IP-Adapter is saved beside the pipeline without it: its weights in ``ip_adapter/``, its image
    encoder in ``image_encoder/``, its scales under ``_diffblocks_ip_adapter`` (:mod:`diffblocks.presets.ip_adapters`).

    Args:
        pipe: a preset pipeline (from ``Pipeline.from_pretrained``, or built from a family's blocks),
            its blocks edited or not.
        folder: created if missing. In a folder that holds a saved pipeline, the previous save's
            files are replaced and every other file is kept; another non-empty folder is replaced
            only with ``overwrite=True``. A link to a folder is written through.
        variant: weight file variant of the saved models (``"fp16"`` -> ``*.fp16.safetensors``),
            recorded in the modular index so that loading picks it without being told.
        max_shard_size: bytes or a string such as ``"5GB"``; larger model weights are sharded.
        safe_serialization: must be True (safetensors only).
        overwrite: replace a non-empty folder that is not a saved pipeline, with everything in it.
        copy_references: also copy components that are still references to Hub repositories.

    Returns:
        The folder written.

    Raises:
        ValueError: the pipeline comes from no known preset, a block can be neither named nor saved
            as code, ``safe_serialization`` is False, a setting is not JSON, or a LoRA or an embedding
            has no safetensors file to record (made from tensors, read from a pickle, or changed since).
        RegistryError: a component's class is not in the manager's registry (nothing is written).
        TypeError: a component is of a kind diffblocks cannot save (nothing is written).
        FileExistsError: ``folder`` is a file or a broken link, a foreign non-empty folder without
            ``overwrite``, or a path the save writes is a link in it (nothing is written).
    """
    if not safe_serialization:
        raise ValueError(_MSG_UNSAFE)
    with ip_adapter_detached(pipe) as ip_adapter:  # saved as the pipeline without it, and it beside (docs/ip_adapter.md)
        return _save_pretrained(pipe, folder, variant, max_shard_size, overwrite, copy_references, ip_adapter)


def _save_pretrained(
    pipe: Pipeline,
    folder: str | os.PathLike[str],
    variant: str | None,
    max_shard_size: int | str | None,
    overwrite: bool,
    copy_references: bool,
    ip_adapter: HeldIPAdapter | None,
) -> Path:
    preset = preset_of(pipe)
    settings = {**preset.settings, "family": preset.family}
    if edited(pipe, preset) is not None:
        tree = tree_to_json(pipe.blocks, registry=BLOCKS)
        code = {file: source.read_bytes() for file, source in tree.code.items()}
        settings[TREE_KEY] = tree.data
        if code:
            settings[CODE_KEY] = {file: hashlib.sha256(data).hexdigest() for file, data in sorted(code.items())}
    else:
        code = {}
    json.dumps(settings)  # a setting that is not JSON fails here, before anything is written
    items = [_plan(pipe, name, key, preset, copy_references) for name, key in sorted(pipe.component_keys().items())]
    loras, lora_files = lora_references(pipe)  # the adapters: references, and local files copied in (docs/lora.md)
    embeddings, embedding_files = embedding_references(pipe)  # textual inversions, alike
    adapted = lora_models(pipe)
    target = Path(folder).expanduser().absolute()
    _check_target(target, overwrite=overwrite)
    family = FAMILIES[preset.family]
    # the classic index names diffusers' classic class; the modular index, its ModularPipeline class when it has one
    class_name = preset.class_name if preset.class_name in family.classes else family.classes[0]
    modular = {"_blocks_class_name": family.modular[1]} if family.modular is not None else {}
    modular_class = family.modular[0] if family.modular is not None else class_name
    replace_all = overwrite and target.is_dir() and any(target.iterdir()) and not is_saved_pipeline(target)
    with staged_save(target, replace_all=replace_all) as staging:
        with contextlib.ExitStack() as stack:
            for model in adapted.values():  # their own weights, without adapters
                stack.enter_context(detached(model))
            stack.enter_context(detached_embeddings(pipe))  # tokenizers and text encoders without the added tokens
            specs = {item.name: _write(pipe.manager, item, staging, variant, max_shard_size) for item in items}
        copy_pinned(staging, {**lora_files, **embedding_files})
        ip_entry = write_ip_adapter(staging, ip_adapter) if ip_adapter is not None else None
        for file, data in code.items():
            (staging / file).parent.mkdir(parents=True, exist_ok=True)
            (staging / file).write_bytes(data)
        classic = _classic_index(items, class_name=class_name, settings=settings)
        # what this save wrote, so that the next save onto the folder removes these and nothing else
        written = [*saved_files(staging), MODULAR_INDEX, *([CLASSIC_INDEX] if classic is not None else [])]
        adapters = {LORAS_KEY: [reference.model_dump(mode="json") for reference in loras]} if loras else {}
        if embeddings:
            adapters[EMBEDDINGS_KEY] = [reference.model_dump(mode="json") for reference in embeddings]
        if ip_entry is not None:
            adapters[IP_ADAPTER_KEY] = ip_entry.model_dump(mode="json")
        ours = {**modular, **settings, **adapters, MANIFEST_KEY: sorted(written)}
        write_modular_index(staging, specs, class_name=modular_class, settings=ours)
        if classic is not None:
            (staging / CLASSIC_INDEX).write_text(json.dumps(classic, indent=2) + "\n")
    return target


def is_saved_pipeline(folder: Path) -> bool:
    """Whether ``folder`` holds a pipeline saved by diffblocks (its modular index says so)."""
    try:
        data = json.loads((folder / MODULAR_INDEX).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "_diffblocks_version" in data


def _registry_key(registry: Registry, cls: type) -> tuple[str, str]:
    """``registry.key_of(cls)``, after importing the allowlisted targets named like ``cls``.

    Targets are registered by public module (``diffblocks.components.schedulers:EulerDiscreteScheduler``)
    while classes live in private ones, and ``key_of`` matches only imported classes or exact paths.

    Raises:
        RegistryError: the registry's own message, when no allowlisted target is ``cls``.
    """
    try:
        return registry.key_of(cls)
    except RegistryError as err:
        for key in registry:
            if key[1] == cls.__name__:
                with contextlib.suppress(RegistryError):
                    registry.resolve(key)
        try:
            return registry.key_of(cls)
        except RegistryError:
            raise err from None


def _classic_index(items: list[_Item], *, class_name: str, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """diffusers' ``model_index.json`` for the saved components; None when some live in other repositories.

    Guiders are left out (diffusers' classic pipelines take none), as are components of other libraries.
    """
    data: dict[str, Any] = {"_class_name": class_name}
    data.update({key: value for key, value in settings.items() if key not in _OUR_SETTINGS})
    for item in items:
        if issubclass(item.cls, AbstractGuider) or item.type_hint[0] not in _CLASSIC_LIBRARIES:
            continue
        if item.reference is not None:
            return None  # diffusers reads components from the repository itself only
        data[item.name] = list(item.type_hint)
    return data


def _plan(pipe: Pipeline, name: str, key: str, preset: PresetInfo, copy_references: bool) -> _Item:
    manager = pipe.manager
    cls = manager.component_type(key) or type(unwrap_compiled(manager.get(key)))
    hint = _registry_key(manager.registry, cls)
    spec = manager.spec(key)
    if spec is not None and spec.repo is not None and not copy_references:
        if spec.repo in preset.sources:
            return _Item(name, key, cls, hint, spec.with_(repo=preset.sources[spec.repo], type_hint=hint))
        if is_hub_id(spec.repo) and not Path(spec.repo).expanduser().exists():
            # only a Hub id is a reference that loading accepts; anything else is copied (or fails to load)
            return _Item(name, key, cls, hint, spec.with_(type_hint=hint))
    if not issubclass(cls, _savable_classes()):
        raise TypeError(_MSG_UNSAVABLE.format(name=name, cls=f"{cls.__module__}.{cls.__qualname__}"))
    return _Item(name, key, cls, hint, None)


def _write(
    manager: ComponentsManager, item: _Item, root: Path, variant: str | None, max_shard_size: int | str | None
) -> ComponentSpec:
    if item.reference is not None:
        return item.reference
    was_loaded = manager.is_loaded(item.key)
    obj = unwrap_compiled(manager.get(item.key))  # a torch.compile wrapper saves the model's own files
    folder = root / item.name
    spec = ComponentSpec(name=item.name, type_hint=item.type_hint, subfolder=item.name)
    quantizer = quantizer_of(obj) if isinstance(obj, torch.nn.Module) else None
    if quantizer is not None and not isinstance(obj, AbstractModel):
        if not _saves_quantized_transformers(obj, quantizer):
            raise TypeError(_MSG_QUANTIZED_FOREIGN.format(name=item.name, cls=type(obj).__name__, quantizer=quantizer.describe()))
        from diffblocks.components.quantizers.transformers_format import save_quantized_transformers

        # transformers' layout: its quantization_config in config.json, the backend's tensors in model.safetensors
        save_quantized_transformers(obj, folder, name=item.name, variant=variant)
        spec = spec.with_(variant=variant)
    elif isinstance(obj, torch.nn.Module):
        shards = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
        obj.save_pretrained(folder, variant=variant, **shards)
        spec = spec.with_(variant=variant, dtype=_dtype_name(obj))
    else:
        obj.save_pretrained(folder)
    if not was_loaded and manager.spec(item.key) is not None:
        manager.unload(item.key)  # saving should not keep a lazy component in memory
    return spec


def _saves_quantized_transformers(obj: object, quantizer: AbstractQuantizer) -> bool:
    """Whether ``obj`` is a transformers model whose quantizer's weights transformers' layout holds."""
    from transformers import PreTrainedModel

    from diffblocks.components.quantizers.transformers_format import SAVED_BACKENDS

    return isinstance(obj, PreTrainedModel) and isinstance(quantizer, SAVED_BACKENDS)


def _savable_classes() -> tuple[type, ...]:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    # several ControlNets save as diffusers saves them: one folder per net (controlnet, controlnet_1, ...)
    return (AbstractModel, PreTrainedModel, PreTrainedTokenizerBase, AbstractScheduler, AbstractGuider, AbstractMultiControlNet)


def _dtype_name(module: torch.nn.Module) -> str | None:
    """The floating-point dtype of the weights, when they share one (recorded so that loading keeps it)."""
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    return str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None


def _check_target(target: Path, *, overwrite: bool) -> None:
    if target.is_file():
        raise FileExistsError(f"{target} is a file; save a pipeline into a folder")
    if target.is_dir() and not overwrite and any(target.iterdir()) and not is_saved_pipeline(target):
        raise FileExistsError(_MSG_EXISTS.format(folder=target))


__all__ = ["is_saved_pipeline", "save_pretrained"]
