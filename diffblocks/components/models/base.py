"""The model base: frozen params named like diffusers' config keys, diffusers-folder load and save."""

from __future__ import annotations

import logging
import os
from abc import ABC
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import nn
from typing_extensions import Self

from diffblocks.components.config_files import read_json_object
from diffblocks.components.hub import resolve_folder
from diffblocks.components.models.loading import (
    CONFIG_NAME,
    CheckpointError,
    find_weight_files,
    hub_patterns,
    load_weights,
    load_weights_mapped,
)
from diffblocks.components.models.saving import save_config, save_weights, saved_as_itself
from diffblocks.components.models.single_file.loading import load_model
from diffblocks.components.models.single_file.reading import SingleFile, resolve_file

if TYPE_CHECKING:
    from diffblocks.components.memory.disk import MemoryMap
    from diffblocks.components.quantizers import AbstractQuantizer

logger = logging.getLogger(__name__)

MAX_WIDTH = 2**16
"""Largest integer setting of a model config (channels, dims, heads, sizes): 65536, 20 times the widest
diffusion model's, so that a config asking for billions of channels is refused before anything is built."""

MAX_LAYERS = 1024
"""Most layers a config may stack (fields named ``*layers*``; Flux.1 stacks 57): building millions would hang."""

MAX_LEVELS = 64
"""Most entries of a per-level tuple (block types, channels per level; models have 2 to 5)."""


class AbstractParams(BaseModel):
    """Architecture hyper-parameters of one model, frozen and validated once.

    Field names equal the diffusers ``config.json`` keys; lists in JSON become tuples. Put the
    invariants in a ``@model_validator(mode="after")`` that raises ``ValueError`` with the numbers.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @model_validator(mode="after")
    def _within_bounds(self) -> Self:
        """Refuse absurd sizes here, before a model (or the meta-device skeleton it loads into) is built."""
        for name, value in self:
            limit = MAX_LAYERS if "layers" in name else MAX_WIDTH
            items = value if isinstance(value, tuple) else (value,)
            if isinstance(value, tuple) and len(value) > MAX_LEVELS:
                raise ValueError(f"{name} has {len(value)} entries; a model config has at most {MAX_LEVELS} levels")
            for item in items:
                if isinstance(item, int) and not isinstance(item, bool) and item > limit:
                    what = "layers" if limit == MAX_LAYERS else "channels, dims, heads or sizes"
                    raise ValueError(f"{name} {value} is larger than {limit}, the most {what} a model config may ask for")
        return self


P = TypeVar("P", bound=AbstractParams)


def _normalise(value: object) -> object:
    """JSON lists compare equal to tuples (config values are read from JSON)."""
    if isinstance(value, (list, tuple)):
        return tuple(_normalise(v) for v in value)  # pyright: ignore[reportUnknownVariableType]
    return value


class AbstractModel(nn.Module, ABC, Generic[P]):
    """A ``torch.nn.Module`` built from :class:`AbstractParams`, loadable from diffusers folders.

    Subclasses set:
        Params: the params class; its fields are the config keys the model reads.
        diffusers_class_name: ``_class_name`` written to ``config.json``.
        fixed_config: diffusers keys the model supports at one value only; another value raises.
            Any other key that is not a Params field is ignored (it does not change the weights).
        repeated_blocks: the block classes the network repeats (a UNet's ResNets, Flux's double
            blocks); regional compilation (:func:`~diffblocks.components.models.compile.compile_model`)
            compiles these alone. Empty: the model is compiled whole.
    """

    Params: ClassVar[type[AbstractParams]]
    diffusers_class_name: ClassVar[str]
    fixed_config: ClassVar[Mapping[str, object]] = {}
    repeated_blocks: ClassVar[tuple[type[nn.Module], ...]] = ()

    params: P

    def __init__(self, params: P) -> None:
        super().__init__()
        if not isinstance(params, self.Params):
            raise TypeError(f"{type(self).__name__} takes {self.Params.__name__}, got {type(params).__name__}.")
        self.params = params

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        """Build a randomly initialised model from a diffusers ``config.json`` mapping.

        Raises:
            ValueError: a key is set to a value this implementation does not support, the params
                fail validation, or ``config`` is a transformers model's (``model_type``/``architectures``).
        """
        if "model_type" in config or "architectures" in config:
            # unknown keys are skipped (diffusers' configs carry some), so a text encoder's config would
            # otherwise build this model at its default, full size without a word
            raise ValueError(
                f"{cls.__name__}.from_config was given a transformers config (model_type "
                f"{config.get('model_type')!r}, architectures {config.get('architectures')!r}), not this model's: "
                f"pass the config.json of the {cls.__name__} folder"
            )
        fields = cls.Params.model_fields
        values: dict[str, Any] = {}
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key in fields:
                values[key] = value
            elif key in cls.fixed_config:
                if _normalise(value) != _normalise(cls.fixed_config[key]):
                    raise ValueError(
                        f"{cls.__name__} does not support {key}={value!r} (only {cls.fixed_config[key]!r})."
                    )
            else:
                logger.debug("%s ignores config key %s=%r", cls.__name__, key, value)
        return cls(cls.Params.model_validate(values))  # pyright: ignore[reportArgumentType]

    def to_config(self) -> dict[str, Any]:
        """The diffusers-compatible ``config.json`` content (``_class_name`` included)."""
        return {
            "_class_name": self.diffusers_class_name,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in self.fixed_config.items()},
            **self.params.model_dump(mode="json"),
        }

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike[str],
        *,
        subfolder: str | None = None,
        variant: str | None = None,
        revision: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        allow_pickle: bool = False,
        quantizer: AbstractQuantizer | None = None,
        memory_map: MemoryMap | None = None,
    ) -> Self:
        """Load a diffusers model folder (local, or a Hub id through the cache) without re-allocating.

        The module is built on the meta device and the checkpoint tensors are assigned into it,
        so weights are allocated once and never randomly initialised.

        Args:
            path_or_repo: a folder, or a Hub id such as ``"org/name"``.
            subfolder: the model's folder inside a pipeline repository (``"unet"``, ``"vae"``).
            variant: weight file variant, such as ``"fp16"``.
            revision: Hub branch, tag or commit.
            dtype: cast floating-point weights to this (default: float32, as built).
            device: where the weights are read to (default: CPU).
            allow_pickle: also accept ``.bin`` pickles, read with ``torch.load(weights_only=True)``.
            quantizer: quantize the float weights once loaded (see :mod:`diffblocks.components.quantizers`).
                A folder saved quantized (``quantization_config`` in its ``config.json``) loads
                quantized without one.
            memory_map: load straight into memory maps of the safetensors files instead of CPU memory
                (see :class:`~diffblocks.components.memory.disk.MemoryMap`, what disk offload loads with).
                Pickles and folders saved quantized are read into memory as usual.

        Raises:
            FileNotFoundError: the folder, ``config.json`` or the weights are missing.
            CheckpointError: weights are corrupt, pickled without ``allow_pickle``, or mismatched.
            ValueError: the config describes an architecture this class does not support, or a
                folder saved quantized is asked for another quantizer.
            QuantizerNotInstalledError, UnsupportedQuantizationError: before any weight is read.
        """
        if quantizer is not None:
            quantizer.check(device)  # a missing package or an impossible type fails before the download
        if memory_map is not None and (quantizer is not None or torch.device(device or "cpu").type != "cpu"):
            raise ValueError(
                f"{cls.__name__}.from_pretrained: memory_map= keeps the weights in files mapped into CPU memory, so it takes "
                f"neither device={device!r} nor a quantizer (whose tensors are made in memory): load with one or the other"
            )
        stem = f"{subfolder}/" if subfolder else ""
        patterns = [stem + name for name in hub_patterns(variant, allow_pickle=allow_pickle)]
        folder = resolve_folder(path_or_repo, subfolder=subfolder, revision=revision, allow_patterns=patterns)
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; is it a diffusers model folder?")
        config = read_json_object(config_path, what="a model config")
        named = config.get("_class_name", cls.diffusers_class_name)
        if named != cls.diffusers_class_name:
            raise ValueError(
                f"{config_path} is for {named}, not {cls.diffusers_class_name}; load it with the matching class."
            )
        files = find_weight_files(folder, variant=variant, allow_pickle=allow_pickle)
        try:
            with torch.device("meta"):
                model = cls.from_config(config)
        except ValueError as err:
            err.add_note(f"while reading {config_path}")
            raise
        saved = config.get("quantization_config")
        if saved is not None:
            from diffblocks.components.models.quantized import load_quantized_weights

            load_quantized_weights(model, files, saved, asked=quantizer, device=device or "cpu", where=config_path)
            return model.eval()
        if memory_map is not None and files[0].suffix == ".safetensors":
            load_weights_mapped(model, files, dtype=dtype, memory_map=memory_map)
            return model.eval()
        load_weights(model, files, dtype=dtype, device=device or "cpu")
        if quantizer is not None:
            from diffblocks.components.quantizers import quantize

            quantize(model, quantizer)
        return model.eval()

    @classmethod
    def from_single_file(
        cls,
        path_or_hub_file: str | os.PathLike[str],
        *,
        config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        allow_pickle: bool = False,
    ) -> Self:
        """Load this model from a single-file checkpoint in its original layout (LDM, SGM or BFL).

        The layout is told from the file's keys, and the model's part found in it (a UNet inside a
        whole SD checkpoint, the VAE of a Flux all-in-one file); the keys are converted by the
        layout's table (see :mod:`diffblocks.components.models.single_file`).

        Args:
            path_or_hub_file: a local file, ``"owner/name/file.safetensors"``, or a huggingface.co URL.
            config: where the config comes from: a folder or Hub id (its ``subfolder`` holds
                ``config.json``), a config mapping, or None to infer it from the file's shapes.
            subfolder: the model's folder inside ``config`` (default: ``"unet"``, ``"vae"`` or
                ``"transformer"``, or the top of ``config`` when it has no such folder).
            revision: Hub branch, tag or commit of the file.
            dtype: cast floating-point weights to this (default: float32, as built).
            device: where the weights are read to (default: CPU).
            allow_pickle: also read pickle checkpoints (``.ckpt``), with ``torch.load(weights_only=True)``.

        Raises:
            ValueError: the keys fit no known layout (the closest is named, with what it lacks).
            CheckpointError: the file is corrupt, pickled without ``allow_pickle``, or lacks weights
                that the config needs.
        """
        file = SingleFile(resolve_file(path_or_hub_file, revision=revision), allow_pickle=allow_pickle)
        return load_model(cls, file, config=config, subfolder=subfolder, dtype=dtype, device=device)

    def save_pretrained(
        self,
        folder: str | os.PathLike[str],
        *,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
    ) -> None:
        """Write ``config.json`` and safetensors weights that diffusers and :meth:`from_pretrained` read.

        Args:
            folder: created if missing; earlier weights of the same variant are replaced.
            variant: file name variant (``"fp16"`` -> ``diffusion_pytorch_model.fp16.safetensors``).
            max_shard_size: bytes or a string such as ``"5GB"``; larger weights are sharded with
                an index file. None writes a single file.

        A quantized model writes its quantizer's ``quantization_config`` into ``config.json`` and
        its quantized tensors as the backend stores them, as diffusers does. Attached LoRA adapters
        are left out (unfused for the save, fused again after): a pipeline's preset records them.
        """
        from diffblocks.components.quantizers import quantizer_of

        path = Path(folder)
        quantizer = quantizer_of(self)
        with saved_as_itself(self):  # attached LoRA adapters left out: the model's own layers, names and weights
            if quantizer is None:
                save_config(self.to_config(), path)
                save_weights(self.state_dict(), path, variant=variant, max_shard_size=max_shard_size)
                return
            # diffusers' layout: the backend's config beside the architecture, its tensors as the backend stores them
            tensors, metadata = quantizer.state_to_save(self)
            config = {**self.to_config(), "quantization_config": quantizer.to_diffusers()}
            save_config(config, path)
            save_weights(tensors, path, variant=variant, max_shard_size=max_shard_size, metadata=metadata)

    def num_parameters(self) -> int:
        """Number of parameter elements."""
        return sum(p.numel() for p in self.parameters())

    def memory_bytes(self) -> int:
        """Bytes held by parameters and buffers (what the model costs on its device)."""
        tensors = [*self.parameters(), *self.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)


__all__ = ["AbstractModel", "AbstractParams", "CheckpointError"]
