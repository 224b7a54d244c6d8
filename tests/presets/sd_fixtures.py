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
    folder: Path,
    *,
    scheduler: str = "EulerDiscreteScheduler",
    in_channels: int = 4,
    force_zeros_for_empty_prompt: bool = True,
    second_width: int = 32,
) -> Path:
    """Save a tiny StableDiffusionXLPipeline: a text-time UNet and two CLIP encoders sharing the real tokenizer.

    ``second_width`` is the second encoder's width; diffusers tells SDXL's single-file encoders
    apart by width (768 and 1280 in the released model), so single-file tests make them differ.
    """
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
        projection_class_embeddings_input_dim=6 * 8 + second_width,  # six time ids of 8 features + the pooled text embedding
        cross_attention_dim=32 + second_width,  # the two encoders' hidden states side by side
    )
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)
    second = _clip_config(num_hidden_layers=3, hidden_size=second_width, projection_dim=second_width)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_config()),
        text_encoder_2=CLIPTextModelWithProjection(second),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_scheduler(scheduler),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def tiny_sd2(folder: Path) -> Path:
    """Save a tiny SD 2.x-style pipeline: linear projections, heads of 64 channels, OpenCLIP-style (gelu)
    text encoder, v-prediction. Shaped by SD 2.1's conventions, so its config can be inferred from its weights."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(64, 128),
        layers_per_block=1,
        sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(1, 2),
        use_linear_projection=True,
        upcast_attention=True,
    )
    scheduler = diffusers.DDIMScheduler(**_SCHEDULER_CONFIG, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False)
    pipe = diffusers.StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_config(hidden_act="gelu")),
        tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def tiny_sdxl_refiner(folder: Path) -> Path:
    """Save a tiny SDXL refiner: the second (OpenCLIP-style) encoder only, five time ids with the aesthetic score."""
    import diffusers
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = _unet(
        4,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=5 * 8 + 32,  # five time ids of 8 features + the pooled text embedding
        cross_attention_dim=32,
    )
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=_vae(),
        text_encoder=None,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(num_hidden_layers=3, hidden_act="gelu")),
        tokenizer=None,
        tokenizer_2=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR),
        unet=unet,
        scheduler=_scheduler("EulerDiscreteScheduler"),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    return folder
