"""Absurd configs (billions of channels or timesteps, millions of layers) are refused before anything is built."""

from __future__ import annotations

from typing import Any

import pytest

from diffblocks.components.models.autoencoder_kl import AutoencoderKL
from diffblocks.components.models.flux import FluxTransformer2DModel
from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.components.schedulers import SCHEDULERS


@pytest.mark.parametrize(
    ("model", "config", "message"),
    [
        (UNet2DConditionModel, {"block_out_channels": (2**30, 2**30, 2**30, 2**30)}, r"block_out_channels .* is larger than 65536, the most channels"),
        (UNet2DConditionModel, {"layers_per_block": 10**6}, r"layers_per_block 1000000 is larger than 1024, the most layers"),
        (AutoencoderKL, {"block_out_channels": (64,) * 1000, "down_block_types": ("DownEncoderBlock2D",) * 1000}, r"has 1000 entries; a model config has at most 64 levels"),
        (FluxTransformer2DModel, {"num_single_layers": 10**7}, r"num_single_layers 10000000 is larger than 1024"),
        (FluxTransformer2DModel, {"joint_attention_dim": 2**40}, r"joint_attention_dim 1099511627776 is larger than 65536"),
    ],
)
def test_absurd_model_configs_are_refused_before_building(model: Any, config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model.from_config(config)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_schedulers_refuse_billions_of_training_timesteps(name: str) -> None:
    with pytest.raises(ValueError, match="num_train_timesteps\n  Input should be less than or equal to 100000"):
        SCHEDULERS[name](num_train_timesteps=10**9)


@pytest.mark.parametrize("model", [UNet2DConditionModel, AutoencoderKL, FluxTransformer2DModel])
def test_a_transformers_config_is_refused_not_built_at_full_size(model: Any) -> None:
    # a text encoder's config.json shares no key with ours: skipping unknown keys would build the default (full) size
    config = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 32}
    with pytest.raises(ValueError, match=rf"{model.__name__}.from_config was given a transformers config \(model_type 'clip_text_model'"):
        model.from_config(config)
