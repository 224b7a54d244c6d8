"""Write a tiny-family model as a diffusers-layout folder with a ``modular_model_index.json``."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from diffblocks.components import ComponentSpec
from diffblocks.components.guiders import AbstractGuider
from diffblocks.components.models.autoencoder_kl import AutoencoderKL
from diffblocks.components.models.saving import save_config, save_weights
from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.components.schedulers import AbstractScheduler
from diffblocks.components.specs import write_modular_index
from diffblocks.presets.tiny.preset import PIPELINE_CLASSES, TEXT_ENCODER_REFERENCE


def _save_model(model: UNet2DConditionModel | AutoencoderKL, folder: Path, dtype: torch.dtype) -> None:
    # Cast a copy of each tensor, never the model: training may go on after a checkpoint.
    state = {
        key: value.detach().to("cpu", dtype if value.is_floating_point() else value.dtype)
        for key, value in model.state_dict().items()
    }
    save_config(model.to_config(), folder)
    save_weights(state, folder)


def save_tiny_model(
    folder: str | os.PathLike[str],
    *,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    scheduler: AbstractScheduler,
    guider: AbstractGuider,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Save the denoiser, autoencoder, scheduler and guider, and an index that loads them with the packaged encoder.

    Args:
        folder: created if missing; its ``unet``, ``vae``, ``scheduler`` and ``guider`` subfolders are replaced.
        unet: the denoiser.
        vae: the autoencoder, with its measured latent statistics in its params.
        scheduler: the sampler the model was trained for.
        guider: the default guidance (its scale is the one the model was evaluated with).
        dtype: weights' dtype on disk (float16 keeps the package small; loading casts to float32).
    """
    root = Path(folder)
    _save_model(unet, root / "unet", dtype)
    _save_model(vae, root / "vae", dtype)
    scheduler.save_pretrained(root / "scheduler")
    guider.save_pretrained(root / "guider")
    local = {
        "unet": ("diffblocks", "UNet2DConditionModel"),
        "vae": ("diffblocks", "AutoencoderKL"),
        "scheduler": ("diffblocks", type(scheduler).__name__),
        "guider": ("diffblocks", type(guider).__name__),
    }
    specs = {name: ComponentSpec(name=name, type_hint=hint, subfolder=name) for name, hint in local.items()}
    # Both read the same folder. The components manager shares objects whose specs name the same
    # folder, so the encoder names it as the package's "model" subfolder and the tokenizer directly.
    package, _, subfolder = TEXT_ENCODER_REFERENCE.rpartition("/")
    specs["text_encoder"] = ComponentSpec(
        name="text_encoder", type_hint=("transformers", "BertModel"), repo=package, subfolder=subfolder
    )
    specs["tokenizer"] = ComponentSpec(
        name="tokenizer", type_hint=("transformers", "BertTokenizerFast"), repo=TEXT_ENCODER_REFERENCE
    )
    return write_modular_index(root, specs, class_name=PIPELINE_CLASSES[0])
