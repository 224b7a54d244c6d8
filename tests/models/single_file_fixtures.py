"""Write tiny diffusers repositories out as single-file checkpoints in their original layouts.

The original keys are made by undoing the layout tables (``to_original``); the tests then load
the files with diffusers' own converter, which is independent of ours, and compare.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from diffblocks.components.models.single_file import BFL, LDM, SGM, Layout, Part, to_original
from diffblocks.components.models.single_file.loading import rules_for

# what a file of each kind bundles: component -> (layout, index of the part, prefix)
SD1 = {"unet": (LDM, 0, "model.diffusion_model."), "vae": (LDM, 1, "first_stage_model."), "text_encoder": (LDM, 2, "cond_stage_model.transformer.")}
SD2 = {**SD1, "text_encoder": (LDM, 3, "cond_stage_model.model.")}
SDXL = {
    "unet": (SGM, 0, "model.diffusion_model."),
    "vae": (SGM, 1, "first_stage_model."),
    "text_encoder": (SGM, 2, "conditioner.embedders.0.transformer."),
    "text_encoder_2": (SGM, 3, "conditioner.embedders.1.model."),
}
SDXL_REFINER = {**{k: v for k, v in SDXL.items() if k in ("unet", "vae")}, "text_encoder_2": (SGM, 3, "conditioner.embedders.0.model.")}
FLUX_TRANSFORMER = {"transformer": (BFL, 0, "")}
FLUX_ALL_IN_ONE = {
    "transformer": (BFL, 0, "model.diffusion_model."),
    "vae": (BFL, 1, "vae."),
    "text_encoder": (BFL, 2, "text_encoders.clip_l.transformer."),
    "text_encoder_2": (BFL, 3, "text_encoders.t5xxl.transformer."),
}
# what LDM training checkpoints carry beside the models; readers must skip it
LDM_EXTRAS = {"alphas_cumprod": torch.linspace(1, 0, 1000), "model_ema.decay": torch.tensor(0.9999)}


def _component(repo: Path, name: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    config = json.loads((repo / name / "config.json").read_text())
    if "_class_name" in config:  # a diffusers model
        import diffusers

        model = getattr(diffusers, config["_class_name"]).from_pretrained(repo, subfolder=name)
        return model.state_dict(), dict(model.config)
    import transformers

    model = getattr(transformers, config["architectures"][0]).from_pretrained(repo / name)
    return model.state_dict(), model.config.to_dict()


def original_state(part: Part, prefix: str, state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    rules = rules_for(part, list(state), config)
    return {prefix + key: tensor for key, tensor in to_original(state, rules).items()}


def write_single_file(repo: Path, path: Path, parts: Mapping[str, tuple[Layout, int, str]], *, extras: Mapping[str, Tensor] | None = None) -> Path:
    """Write the components of the diffusers ``repo`` that ``parts`` names into one file at ``path``."""
    tensors: dict[str, Tensor] = dict(extras or {})
    for name, (layout, index, prefix) in parts.items():
        state, config = _component(repo, name)
        tensors.update(original_state(layout.parts[index], prefix, state, config))
    save_file({key: tensor.detach().clone().contiguous() for key, tensor in tensors.items()}, str(path))
    return path
