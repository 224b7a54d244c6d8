"""Write a module's weights as a diffusers-format safetensors folder (optionally sharded)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

from huggingface_hub import get_torch_storage_id, get_torch_storage_size, split_state_dict_into_shards_factory
from safetensors.torch import save_file
from torch import Tensor, nn

from diffblocks.components.models.loading import CONFIG_NAME, index_names, single_name

_SHARD = re.compile(r"-\d{5}-of-\d{5}")

SaveView = Callable[[nn.Module], AbstractContextManager[Any]]
"""A context in which a model holds only its own layers and weights (LoRA's ``detached``)."""

_SAVE_VIEWS: list[SaveView] = []


def register_save_view(view: SaveView) -> SaveView:
    """Save every model inside ``view(model)``: for wrappers a package above this one puts into models
    (LoRA adapters), so that a saved model is the model itself, under its own names."""
    if view not in _SAVE_VIEWS:
        _SAVE_VIEWS.append(view)
    return view


@contextmanager
def saved_as_itself(model: nn.Module) -> Iterator[None]:
    """``model`` inside every registered save view for the ``with`` block."""
    with ExitStack() as stack:
        for view in _SAVE_VIEWS:
            stack.enter_context(view(model))
        yield


def _stale_weight_files(folder: Path, variant: str | None) -> list[Path]:
    """Weight files of the same variant left by an earlier save (they would shadow the new one)."""
    prefix = single_name("safetensors", variant).removesuffix(".safetensors")
    names = {single_name("safetensors", variant), *index_names("safetensors", variant)}
    stale: list[Path] = []
    for path in folder.iterdir():
        sharded = path.suffix == ".safetensors" and path.stem.startswith(prefix)
        if path.name in names or (sharded and _SHARD.fullmatch(path.stem.removeprefix(prefix)) is not None):
            stale.append(path)
    return stale


def save_weights(
    state_dict: Mapping[str, Tensor],
    folder: Path,
    *,
    variant: str | None = None,
    max_shard_size: int | str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Save ``state_dict`` into ``folder`` with diffusers' file names; return the files written.

    Args:
        state_dict: tensors by diffusers key.
        folder: created if missing.
        variant: inserted in the file names (``diffusion_pytorch_model.fp16.safetensors``).
        max_shard_size: bytes (or a string such as ``"5GB"``) per shard; shards and an index file
            are written only when the weights exceed it. None writes one file.
        metadata: extra safetensors header entries, written into every shard (torchao's
            description of its flattened tensors, which loading needs whole).
    """
    folder.mkdir(parents=True, exist_ok=True)
    for path in _stale_weight_files(folder, variant):
        path.unlink()
    pattern = single_name("safetensors", variant).replace(".safetensors", "{suffix}.safetensors")
    split = split_state_dict_into_shards_factory(
        dict(state_dict),
        get_storage_size=_nbytes,
        get_storage_id=_tie,
        max_shard_size=max_shard_size if max_shard_size is not None else 2**62,
        filename_pattern=pattern,
    )
    written: list[Path] = []
    for filename, keys in split.filename_to_tensors.items():
        shard = {key: state_dict[key].detach().contiguous() for key in keys}
        save_file(shard, str(folder / filename), metadata={**(metadata or {}), "format": "pt"})
        written.append(folder / filename)
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
        index_path = folder / index_names("safetensors", variant)[0]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(index_path)
    return written


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size() if type(tensor) is Tensor else get_torch_storage_size(tensor)


def _tie(tensor: Tensor) -> object:
    """What tied tensors share: the same bytes. Views side by side in one buffer (an offloaded model's
    home, packed per group) are not tied, though huggingface_hub's storage id would say so."""
    if type(tensor) is not Tensor or tensor.device.type == "meta":
        return get_torch_storage_id(tensor)
    return (tensor.device, tensor.data_ptr(), _nbytes(tensor))


def save_config(config: Mapping[str, Any], folder: Path) -> Path:
    """Write ``config.json`` the way diffusers does (sorted keys, two-space indent)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_NAME
    path.write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    return path


__all__ = ["SaveView", "register_save_view", "save_config", "save_weights", "saved_as_itself"]
