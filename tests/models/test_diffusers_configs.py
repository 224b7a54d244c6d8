"""diffusers' own test configs load into our models, and give diffusers' outputs with diffusers' weights.

The config dicts are copied verbatim from diffusers' test suite (file and function named above each);
only the diffusers version the oracle pins (0.42.1) runs them. Each builds diffusers' model, ours from
``config.json`` as diffusers writes it, copies the weights across (strict) and compares outputs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL as RefVAE
from diffusers import FluxTransformer2DModel as RefFlux
from diffusers import UNet2DConditionModel as RefUNet
from torch import nn

from diffblocks.components.models import AbstractModel
from diffblocks.components.models.autoencoder_kl import AutoencoderKL
from diffblocks.components.models.flux import FluxTransformer2DModel, prepare_image_ids, prepare_text_ids
from diffblocks.components.models.unet import UNet2DConditionModel

TOL = 1e-5  # float32 rounding

# tests/models/unets/test_models_unet_2d_condition.py, prepare_init_args_and_inputs_for_common
UNET_COMMON: dict[str, Any] = {
    "block_out_channels": (4, 8),
    "norm_num_groups": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 8,
    "attention_head_dim": 2,
    "out_channels": 4,
    "in_channels": 4,
    "layers_per_block": 1,
    "sample_size": 16,
}
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "unet_common": UNET_COMMON,
    # the same file: test_model_with_attention_head_dim_tuple (and the slicing, IP-adapter, pickle tests)
    "unet_head_dim_tuple": {**UNET_COMMON, "block_out_channels": (16, 32), "attention_head_dim": (8, 16)},
    # test_model_with_use_linear_projection
    "unet_linear_projection": {**UNET_COMMON, "use_linear_projection": True},
    # test_model_with_cross_attention_dim_tuple
    "unet_cross_attention_dim_tuple": {**UNET_COMMON, "cross_attention_dim": (8, 8)},
    # tests/pipelines/stable_diffusion/test_stable_diffusion.py, get_dummy_components: attention_head_dim is
    # diffusers' default 8, which does not divide the 4 channels of the first stage, a stage without attention
    "sd_pipeline": {
        "block_out_channels": (4, 8),
        "layers_per_block": 1,
        "sample_size": 32,
        "time_cond_proj_dim": None,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 8,
        "norm_num_groups": 2,
    },
    # tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py, get_dummy_components
    "sdxl_pipeline": {
        "block_out_channels": (2, 4),
        "layers_per_block": 2,
        "time_cond_proj_dim": None,
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "transformer_layers_per_block": (1, 2),
        "projection_class_embeddings_input_dim": 80,  # 6 * 8 + 32
        "cross_attention_dim": 64,
        "norm_num_groups": 1,
    },
}

VAE_CONFIGS: dict[str, dict[str, Any]] = {
    # tests/models/autoencoders/test_models_autoencoder_kl.py, AutoencoderKLTesterConfig.get_init_dict
    "vae_common": {
        "block_out_channels": [2, 4],
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "latent_channels": 4,
        "norm_num_groups": 2,
    },
    # tests/pipelines/stable_diffusion/test_stable_diffusion.py, get_dummy_components
    "sd_pipeline_vae": {
        "block_out_channels": [4, 8],
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4,
        "norm_num_groups": 2,
    },
    # tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py, get_dummy_components
    "sdxl_pipeline_vae": {
        "block_out_channels": [32, 64],
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4,
        "sample_size": 128,
    },
}

# tests/models/transformers/test_models_transformer_flux.py, FluxTransformerTesterConfig.get_init_dict
FLUX_COMMON: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": [4, 4, 8],
}


def _ours(cls: type[AbstractModel[Any]], ref: nn.Module) -> nn.Module:
    """Our model built from the config diffusers saves for ``ref``, holding ``ref``'s weights."""
    ours = cls.from_config(dict(ref.config)).eval()  # pyright: ignore[reportAttributeAccessIssue]
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


@pytest.mark.parametrize("config", UNET_CONFIGS.values(), ids=UNET_CONFIGS.keys())
@torch.no_grad()
def test_unet_configs(config: dict[str, Any]) -> None:
    torch.manual_seed(0)
    ref = RefUNet(**config).eval()
    ours = _ours(UNet2DConditionModel, ref)
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, config["in_channels"], 16, 16, generator=g)
    width = config["cross_attention_dim"]
    context = torch.randn(2, 4, width if isinstance(width, int) else width[0], generator=g)
    added: dict[str, torch.Tensor] | None = None
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        added = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.rand(2, 6, generator=g) * 64}
    timestep = torch.tensor([10, 500])
    expected = ref(sample, timestep, context, added_cond_kwargs=added).sample
    assert (ours(sample, timestep, context, added_cond_kwargs=added) - expected).abs().max() <= TOL


@pytest.mark.parametrize("config", VAE_CONFIGS.values(), ids=VAE_CONFIGS.keys())
@torch.no_grad()
def test_vae_configs(config: dict[str, Any]) -> None:
    torch.manual_seed(0)
    ref = RefVAE(**config).eval()
    ours = _ours(AutoencoderKL, ref)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = ref(images, sample_posterior=True, generator=torch.Generator().manual_seed(2)).sample
    got = ours(images, sample_posterior=True, generator=torch.Generator().manual_seed(2))
    assert (got - expected).abs().max() <= TOL


@torch.no_grad()
def test_flux_config() -> None:
    torch.manual_seed(0)
    ref = RefFlux(**FLUX_COMMON).eval()
    ours = _ours(FluxTransformer2DModel, ref)
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 4 * 4, 4, generator=g),
        "encoder_hidden_states": torch.randn(1, 48, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([1.0]),
        "img_ids": prepare_image_ids(4, 4),
        "txt_ids": prepare_text_ids(48),
    }
    expected = ref(**inputs, return_dict=False)[0]
    assert (ours(**inputs) - expected).abs().max() <= TOL


def test_heads_are_checked_on_the_stages_that_attend() -> None:
    from pydantic import ValidationError

    from diffblocks.components.models.unet import UNet2DConditionParams

    plain_first = {"block_out_channels": (4, 8), "norm_num_groups": 2,
                   "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D")}  # fmt: skip
    attend_first = ("UpBlock2D", "CrossAttnUpBlock2D")  # the last up block runs the first stage
    with pytest.raises(ValidationError, match=r"attention_head_dim 3 .* block_out_channels\[1\] 8 of an attention stage"):
        UNet2DConditionParams(**plain_first, attention_head_dim=3, up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    params = UNet2DConditionParams(**plain_first, attention_head_dim=(4, 8), up_block_types=attend_first)
    assert params.attention_stages == (0, 1)
    with pytest.raises(ValidationError, match=r"attention_head_dim 8 .* block_out_channels\[0\] 4"):
        UNet2DConditionParams(**plain_first, attention_head_dim=8, up_block_types=attend_first)
