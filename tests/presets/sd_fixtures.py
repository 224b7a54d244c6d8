"""Tiny random SD 1.5 and SDXL repositories built with diffusers, the reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.conftest import CLIP_TOKENIZER_DIR

_SCHEDULER_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def _vae() -> Any:
    import diffusers

    return diffusers.AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )


def _unet(in_channels: int, **changes: Any) -> Any:
    """Two levels, cross-attention in the lower-resolution one; ``changes`` set attention and conditioning."""
    import diffusers

    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        **changes,
    )


def _clip_config(**changes: Any) -> Any:
    from transformers import CLIPTextConfig

    values = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    return CLIPTextConfig(**{**values, **changes})


def _scheduler(name: str) -> Any:
    import diffusers

    config = dict(_SCHEDULER_CONFIG)
    if name == "PNDMScheduler":
        config.update(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    if name == "EulerDiscreteScheduler":
        config.update(steps_offset=1, timestep_spacing="leading")
    if name == "DPMSolverSDEScheduler":  # a fixed Brownian path, so that runs compare
        config.update(use_karras_sigmas=True, noise_sampler_seed=0)
    return getattr(diffusers, name)(**config)


def tiny_sd15(folder: Path, *, scheduler: str = "PNDMScheduler", in_channels: int = 4) -> Path:
    """Save a tiny StableDiffusionPipeline (random weights, real CLIP tokenizer) to ``folder``."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = _unet(in_channels, cross_attention_dim=32, attention_head_dim=8)
    pipe = diffusers.StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_config()),
        tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR),
        unet=unet,
        scheduler=_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def tiny_sdxl(
    folder: Path, *, scheduler: str = "EulerDiscreteScheduler", in_channels: int = 4, force_zeros_for_empty_prompt: bool = True
) -> Path:
    """Save a tiny StableDiffusionXLPipeline: a text-time UNet and two CLIP encoders sharing the real tokenizer."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = _unet(
        in_channels,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids of 8 features + the pooled text embedding
        cross_attention_dim=64,  # the two encoders' hidden states side by side
    )
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_config()),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(num_hidden_layers=3)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_scheduler(scheduler),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    return folder
