"""Build a model from the part of a single file that holds it: config first, then the converted weights."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from diffblocks.components.containment import contained_path
from diffblocks.components.hub import resolve_folder
from diffblocks.components.models.loading import CONFIG_NAME, CheckpointError, load_state
from diffblocks.components.models.single_file.bfl import BFL
from diffblocks.components.models.single_file.controlnet import CONTROL
from diffblocks.components.models.single_file.layout import Layout, Part, find_part
from diffblocks.components.models.single_file.ldm import LDM
from diffblocks.components.models.single_file.reading import SingleFile
from diffblocks.components.models.single_file.rules import Rule, converted
from diffblocks.components.models.single_file.sgm import SGM

if TYPE_CHECKING:  # the model base calls this module, so it is imported for the annotations only
    from diffblocks.components.models.base import AbstractModel

LAYOUTS: tuple[Layout, ...] = (LDM, SGM, BFL, CONTROL)
"""The layouts read, in the order they are tried."""

M = TypeVar("M", bound="AbstractModel[Any]")
T = TypeVar("T", bound=nn.Module)

_MSG_MISSING = (
    "{file}: the {component} under {prefix!r} lacks {count} of the tensors a {model} with this config needs: "
    "{listing}. Is the config (from {source}) for another model?"
)


def rules_for(part: Part, keys: list[str], config: Mapping[str, Any]) -> dict[str, Rule]:
    """Our key -> its rule, for every key of the model (a key the table does not place is an error)."""
    rules: dict[str, Rule] = {}
    unplaced: list[str] = []
    for key in keys:
        rule = part.table(key, config)
        if rule is None:
            unplaced.append(key)
        else:
            rules[key] = rule
    if unplaced:
        raise CheckpointError(
            f"the {part.component} table has no place for {len(unplaced)} weights of {part.class_name}: "
            f"{', '.join(unplaced[:5])}; this model variant is not stored in this layout"
        )
    return rules


def convert_part(
    file: SingleFile,
    part: Part,
    *,
    prefix: str,
    shapes: Mapping[str, tuple[int, ...]],
    config: Mapping[str, Any],
    source: str,
) -> dict[str, Tensor]:
    """Our weights (keys and shapes of ``shapes``) made from the file's ``part`` under ``prefix``.

    Raises:
        CheckpointError: tensors the rules name are absent from the file (all listed at once).
    """
    rules = rules_for(part, list(shapes), config)
    needed = sorted({prefix + rule.key for rule in rules.values()})
    missing = [key for key in needed if key not in file.shapes]
    if missing:
        listing = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise CheckpointError(
            _MSG_MISSING.format(
                file=file.path.name, component=part.component, prefix=prefix, count=len(missing),
                model=part.class_name, listing=listing, source=source,
            )
        )
    tensors = {key[len(prefix) :]: tensor for key, tensor in file.tensors(needed).items()}
    return {key: converted(rule, tensors, shapes[key]) for key, rule in rules.items()}


def read_config(config: str | os.PathLike[str], subfolder: str | None, *, revision: str | None = None) -> dict[str, Any]:
    """A model's ``config.json`` from a folder or Hub id: in ``subfolder`` when the folder has it, else at its top."""
    patterns = [f"{subfolder}/{CONFIG_NAME}", CONFIG_NAME] if subfolder else [CONFIG_NAME]
    root = resolve_folder(config, revision=revision, allow_patterns=patterns)
    inside = [contained_path(root, subfolder, repository=str(config), entry="subfolder")] if subfolder else []
    for folder in [*inside, root]:
        if (folder / CONFIG_NAME).is_file():
            data: dict[str, Any] = json.loads((folder / CONFIG_NAME).read_text())
            return data
    where = f"{subfolder}/{CONFIG_NAME} or {CONFIG_NAME}" if subfolder else CONFIG_NAME
    raise FileNotFoundError(f"{config!s} has no {where} (looked in {root})")


def load_model(
    cls: type[M],
    file: SingleFile,
    *,
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> M:
    """One of our models (``cls`` is an :class:`~diffblocks.components.models.AbstractModel`) from ``file``.

    Args:
        config: a folder or Hub id holding the model's ``config.json`` (in ``subfolder``, by default
            the part's usual one: ``"unet"``, ``"vae"``, ``"transformer"``), a config mapping, or
            None to infer the config from the file's shapes.
        defaults: config values the shapes do not hold (the family's), used when inferring.
    """
    part, prefix = find_part(file.shapes, cls.diffusers_class_name, LAYOUTS, file=file.path.name)
    values, source = _config(part, prefix, file, config, subfolder, revision, defaults)
    with torch.device("meta"):
        model = cls.from_config(values)
    shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    state = convert_part(file, part, prefix=prefix, shapes=shapes, config=values, source=source)
    load_state(model, state, where=file.path, dtype=dtype, device=device or "cpu")
    return model.eval()


def load_transformers_model(
    cls: type[T],
    file: SingleFile,
    part: Part,
    *,
    prefix: str,
    config: str | os.PathLike[str],
    subfolder: str | None,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> T:
    """A transformers text encoder from its part of ``file``; its config comes from a folder or Hub id."""
    patterns = [f"{subfolder}/{CONFIG_NAME}" if subfolder else CONFIG_NAME]  # the config only: the weights are in the file
    folder = resolve_folder(config, subfolder=subfolder, revision=revision, allow_patterns=patterns)
    model_config = getattr(cls, "config_class").from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        skeleton = cls(model_config)
    shapes = {key: tuple(t.shape) for key, t in skeleton.state_dict().items()}
    state = convert_part(file, part, prefix=prefix, shapes=shapes, config=model_config.to_dict(), source=str(config))
    wrong = [f"{k} {tuple(v.shape)} != {shapes[k]}" for k, v in state.items() if tuple(v.shape) != shapes[k]]
    if wrong:
        listing = ", ".join(wrong[:5])
        raise CheckpointError(f"{file.path.name}: the {part.component} does not match the config from {config}: {listing}")
    kwargs: dict[str, Any] = {"config": model_config, "state_dict": state}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = getattr(cls, "from_pretrained")(None, **kwargs)
    model.eval()
    return model.to(device) if device is not None else model


def _config(
    part: Part,
    prefix: str,
    file: SingleFile,
    config: str | os.PathLike[str] | Mapping[str, Any] | None,
    subfolder: str | None,
    revision: str | None,
    defaults: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], str]:
    if isinstance(config, Mapping):
        return dict(config), "the given config"
    if config is not None:
        return read_config(config, subfolder or part.component, revision=revision), str(config)
    if part.infer is None:
        raise ValueError(
            f"the config of the {part.component} cannot be inferred from the file; pass config= a folder or Hub id"
        )
    return {**(defaults or {}), **part.infer(part.shapes(file.shapes, prefix))}, "the file's shapes"


__all__ = ["LAYOUTS", "convert_part", "load_model", "load_transformers_model", "read_config", "rules_for"]
