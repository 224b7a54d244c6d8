"""Tiny random Flux.1 repositories (dev and schnell) built with diffusers, the reference."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import CLIP_TOKENIZER_DIR, T5_TOKENIZER_DIR

# 4 VAE levels, so one latent spans 8 pixels and a token 16, as in the released models
VAE_SCALE_FACTOR = 8


def tiny_flux(folder: Path, *, guidance_embeds: bool = True, double_blocks: int = 1) -> Path:
    """Save a tiny FluxPipeline (random weights, real CLIP and T5 tokenizers) to ``folder``.

    ``guidance_embeds=True`` is shaped like dev (dynamic shifting), False like schnell (no shift).
    ``double_blocks=10`` gives the transformer the blocks that Flux's default guider layers name.
    """
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=double_blocks,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
    )
    if guidance_embeds:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
        )
    else:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = diffusers.FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR),
        text_encoder_2=text_encoder_2,
        tokenizer_2=T5TokenizerFast.from_pretrained(T5_TOKENIZER_DIR),
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder
