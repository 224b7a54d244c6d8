"""The SGM (Stability ``generative-models``) layout of SDXL base and refiner checkpoints.

The UNet (``model.diffusion_model.``) and the VAE (``first_stage_model.``) are stored as in LDM
files and use the tables of :mod:`.ldm`; SDXL's size conditioning adds ``label_emb``. The text
encoders sit under ``conditioner.embedders.<n>.``: for the base, OpenAI CLIP ViT-L in transformers'
names (``0.transformer.``) and OpenCLIP ViT-bigG with its projection (``1.model.``); the refiner
has only the OpenCLIP encoder, as ``0.model.``.
"""

from __future__ import annotations

from diffblocks.components.models.single_file.layout import Layout, Part, Shapes
from diffblocks.components.models.single_file.ldm import UNET_PART, VAE_PART, clip_table, open_clip_table

_OPEN_CLIP_SIGNATURE = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection")

SGM = Layout(
    "sgm",
    "SGM (Stability generative-models: SDXL base and refiner)",
    (
        UNET_PART,
        VAE_PART,
        Part(
            "text_encoder",
            "CLIPTextModel",
            ("conditioner.embedders.0.transformer.",),
            ("text_model.embeddings.token_embedding.weight", "text_model.final_layer_norm.weight"),
            clip_table,
        ),
        Part(
            "text_encoder_2",
            "CLIPTextModelWithProjection",
            ("conditioner.embedders.1.model.", "conditioner.embedders.0.model."),
            _OPEN_CLIP_SIGNATURE,
            open_clip_table,
        ),
    ),
)


def is_sgm(shapes: Shapes) -> bool:
    """SDXL files have text encoders under ``conditioner.`` or a UNet with size conditioning (``label_emb``)."""
    return any(key.startswith("conditioner.embedders.") for key in shapes) or "model.diffusion_model.label_emb.0.0.weight" in shapes


def is_refiner(shapes: Shapes) -> bool:
    """The refiner's only text encoder is OpenCLIP as embedder 0; a UNet alone tells by its 1280-wide context."""
    if any(key.startswith("conditioner.embedders.") for key in shapes):
        return "conditioner.embedders.0.model.ln_final.weight" in shapes
    context = [shape[-1] for key, shape in shapes.items() if key.endswith("attn2.to_k.weight")]
    return bool(context) and context[0] == 1280


__all__ = ["SGM", "is_refiner", "is_sgm"]
