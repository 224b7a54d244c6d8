"""The tiny model's architecture: a small UNet over the 16 x 16 x 4 latents of a factor-4 autoencoder.

One place for the configs, read by training (to build the models) and by export (to write them),
so the shipped ``config.json`` files and the trained weights cannot disagree. Every value is a
diffusers config key, so the shipped folders also load in diffusers.
"""

from __future__ import annotations

from typing import Any

from diffblocks.components.models.autoencoder_kl import AutoencoderKL
from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.components.schedulers import FlowMatchEulerDiscreteScheduler
from diffblocks.presets.tiny.text_encoder import HIDDEN_SIZE

IMAGE_SIZE = 64
LATENT_CHANNELS = 4
VAE_FACTOR = 4
LATENT_SIZE = IMAGE_SIZE // VAE_FACTOR

# Three resolutions (16, 8, 4) with cross-attention at each: the 4 x 4 level sees the whole layout,
# the 16 x 16 level places edges. Heads of 32 channels. 11.9 M parameters, ~24 MB in float16.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": LATENT_SIZE,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "block_out_channels": [64, 128, 192],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3,
    "up_block_types": ["CrossAttnUpBlock2D"] * 3,
    "attention_head_dim": [2, 4, 6],
    "cross_attention_dim": HIDDEN_SIZE,
    "norm_num_groups": 32,
}

# Two downsamplings (64 -> 16). 2.7 M parameters, ~5 MB in float16. The latent statistics are
# measured after training and written into the shipped config (see train/autoencoder.py).
VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [32, 64, 128],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 1,
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": 32,
    "sample_size": IMAGE_SIZE,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
    "force_upcast": False,
}

# Rectified flow: x_t = (1 - sigma) x_0 + sigma * noise, the model predicts noise - x_0, t = 1000 sigma.
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 1.0}


def new_unet() -> UNet2DConditionModel:
    """The tiny denoiser, randomly initialised."""
    return UNet2DConditionModel.from_config(UNET_CONFIG)


def new_vae() -> AutoencoderKL:
    """The tiny autoencoder, randomly initialised."""
    return AutoencoderKL.from_config(VAE_CONFIG)


def new_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The sampler the model is trained for (and its ``add_noise`` the training interpolation)."""
    return FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
