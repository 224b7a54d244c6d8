"""Load a ready pipeline from one single-file checkpoint (SD 1.x/2.x, SDXL base and refiner, Flux.1).

A single file holds weights only. Its kind (which model, which layout) is told from its keys;
the models it bundles are built from it, and what it lacks (tokenizers, the scheduler, and any
model not bundled, such as T5 beside most Flux files) comes from a diffusers-layout repository:
``config=`` when given, else the released repository of that kind (through the Hub cache). With
``config=`` the bundled models take their configs from that repository too; without it they are
inferred from the file's shapes, with the kind's defaults for what the weights do not hold.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from diffblocks.blocks import Pipeline
from diffblocks.components import ComponentsManager
from diffblocks.components.models import AbstractModel
from diffblocks.components.models.single_file import BFL, LDM, SGM, Layout, SingleFile, resolve_file
from diffblocks.components.models.single_file.bfl import TRANSFORMER_PART, has_guidance
from diffblocks.components.models.single_file.layout import no_layout_error
from diffblocks.components.models.single_file.ldm import UNET_PART, sd_version
from diffblocks.components.models.single_file.loading import load_model, load_transformers_model
from diffblocks.components.models.single_file.sgm import is_refiner, is_sgm
from diffblocks.components.specs import read_index
from diffblocks.presets.loading import from_pretrained
from diffblocks.registry import COMPONENTS

_MSG_NO_REPO = (
    "{file} holds weights only; its tokenizers and scheduler come from {repo!r} ({why}). Download that "
    "repository (`hf download {repo}`), or pass config= a folder or Hub id of the same model in diffusers layout."
)


@dataclass(frozen=True)
class Kind:
    """A model that single files are released for: its layout, its repository, and what its weights do not say.

    Attributes:
        name: ``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"sdxl-refiner"``, ``"flux-dev"`` or ``"flux-schnell"``.
        layout: the key layout of its files.
        repo: the diffusers repository that completes a file (tokenizers, scheduler, configs).
        defaults: per component, config values used when the config is inferred from the shapes.
    """

    name: str
    layout: Layout
    repo: str
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


_SD_VAE = {"scaling_factor": 0.18215}
_XL_VAE = {"scaling_factor": 0.13025}
_FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}

KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("sd1", LDM, "stable-diffusion-v1-5/stable-diffusion-v1-5", {"unet": {"sample_size": 64}, "vae": _SD_VAE}),
        # SD 2.1 (768, v-prediction) is the default; 2.x base models are epsilon: pass config= their repository
        Kind("sd2", LDM, "stabilityai/stable-diffusion-2-1", {"unet": {"sample_size": 96, "upcast_attention": True}, "vae": _SD_VAE}),
        Kind("sdxl", SGM, "stabilityai/stable-diffusion-xl-base-1.0", {"unet": {"sample_size": 128}, "vae": _XL_VAE}),
        Kind("sdxl-refiner", SGM, "stabilityai/stable-diffusion-xl-refiner-1.0", {"unet": {"sample_size": 128}, "vae": _XL_VAE}),
        Kind("flux-dev", BFL, "black-forest-labs/FLUX.1-dev", {"vae": _FLUX_VAE}),
        Kind("flux-schnell", BFL, "black-forest-labs/FLUX.1-schnell", {"vae": _FLUX_VAE}),
    )
}


def kind_of(file: SingleFile) -> Kind:
    """Which model ``file`` is, from its keys.

    Raises:
        ValueError: it holds neither an LDM/SGM UNet nor a BFL transformer; names the closest and what it lacks.
    """
    shapes = file.shapes
    if TRANSFORMER_PART.prefix_in(shapes) is not None:
        return KINDS["flux-dev" if has_guidance(shapes) else "flux-schnell"]
    if UNET_PART.prefix_in(shapes) == "model.diffusion_model.":
        if is_sgm(shapes):
            return KINDS["sdxl-refiner" if is_refiner(shapes) else "sdxl"]
        return KINDS[sd_version(shapes)]
    candidates = [(LDM, UNET_PART), (BFL, TRANSFORMER_PART)]
    what = "a pipeline (a UNet or a Flux transformer)"
    raise no_layout_error(shapes, candidates, what=what, file=file.path.name, layouts=(LDM, SGM, BFL))


def from_single_file(
    path_or_hub_file: str | os.PathLike[str],
    config: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    allow_pickle: bool = False,
    manager: ComponentsManager | None = None,
    components: Mapping[str, Any] | None = None,
) -> Pipeline:
    """A ready pipeline from a single-file checkpoint, completed by a diffusers-layout repository.

    Args:
        path_or_hub_file: a local file, ``"owner/name/file.safetensors"``, or a huggingface.co URL.
        config: a folder or Hub id of the same model in diffusers layout, for the tokenizers, the
            scheduler, the models the file lacks and every model's config; by default the released
            repository of the file's kind, and the bundled models' configs inferred from the file.
        dtype: weights' dtype for the models.
        device: where models are loaded.
        revision: Hub branch, tag or commit of the file.
        allow_pickle: also read pickle checkpoints (``.ckpt``), with ``torch.load(weights_only=True)``.
        manager: share components with other pipelines through this manager.
        components: objects or specs that replace components (``{"scheduler": ...}``); a component
            given here is not read from the file.
    """
    file = SingleFile(resolve_file(path_or_hub_file, revision=revision), allow_pickle=allow_pickle)
    kind = kind_of(file)
    repo = os.fspath(config) if config is not None else kind.repo
    try:
        index = read_index(repo)
    except FileNotFoundError as err:
        if config is not None:
            raise
        why = "not in the Hub cache or unreachable"
        raise FileNotFoundError(_MSG_NO_REPO.format(file=file.path.name, repo=repo, why=why)) from err
    given = dict(components or {})
    for part in kind.layout.parts:
        prefix = part.prefix_in(file.shapes)
        spec = index.components.get(part.component)
        if prefix is None or spec is None or spec.type_hint is None or part.component in given:
            continue  # not bundled, not part of this pipeline, or replaced by the caller
        cls = COMPONENTS.resolve(spec.type_hint)
        if cls.__name__ != part.class_name:
            continue  # the repository's component is another model (a different text encoder)
        if issubclass(cls, AbstractModel):
            given[part.component] = load_model(
                cls,
                file,
                config=repo if config is not None else None,
                subfolder=spec.subfolder,
                defaults=kind.defaults.get(part.component),
                dtype=dtype,
                device=device,
            )
        else:  # transformers' text encoders
            given[part.component] = load_transformers_model(
                cls, file, part, prefix=prefix, config=repo, subfolder=spec.subfolder, dtype=dtype, device=device
            )
    return from_pretrained(repo, dtype=dtype, device=device, manager=manager, components=given)


__all__ = ["KINDS", "Kind", "from_single_file", "kind_of"]
