"""Which keys of a LoRA file are for which model of a pipeline: the denoiser or a text encoder.

A file trained with the text encoders holds their layers beside the denoiser's. Its keys are
sorted by prefix, through one table, before each part is read for its model by
:func:`~diffblocks.components.lora.formats.convert`:

| prefix | who writes it | model | layer name | example |
|---|---|---|---|---|
| ``text_encoder.``, ``text_encoder_2.`` | diffusers / PEFT | ``text_encoder``, ``text_encoder_2`` | the module path in the checkpoint | ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj`` |
| ``lora_te_`` | kohya / sd-scripts, SD 1.x | ``text_encoder`` | the module path, ``.`` written ``_`` | ``lora_te_text_model_encoder_layers_0_mlp_fc1`` |
| ``lora_te1_``, ``lora_te2_`` | kohya / sd-scripts, SDXL (CLIP-L, CLIP-G) and Flux (CLIP-L) | ``text_encoder``, ``text_encoder_2`` | as above | ``lora_te2_text_model_encoder_layers_0_self_attn_out_proj`` |
| ``lora_te3_`` | sd-scripts, Flux's T5-XXL (SD3's numbering) | ``text_encoder_2`` | as above | ``lora_te3_encoder_block_0_layer_0_SelfAttention_q`` |
| ``text_encoders.clip_l.transformer.``, ``text_encoders.t5xxl.transformer.`` | ComfyUI, Flux | ``text_encoder``, ``text_encoder_2`` | the module path in the checkpoint | ``text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc2`` |

A module path in the checkpoint is the transformers model's, except that transformers 5 builds
``CLIPTextModel`` without the ``text_model.`` level its checkpoints (and so every LoRA file) name:
:func:`~diffblocks.components.lora.names.layer_names` gives those names too, and the module path
as the model has it is read as well. Every other key is the denoiser's (:data:`~diffblocks.components.lora.formats.PREFIXES`). The
parts are the denoiser's (``lora_A``/``lora_down``, ``lora_B``/``lora_up``, ``alpha``), and
diffusers' older attention-processor names are renamed first, as diffusers' own
``DIFFUSERS_OLD_TO_PEFT`` table does: ``self_attn.to_q_lora.down.weight`` is
``self_attn.q_proj.lora_A.weight`` (``to_k``, ``to_v`` likewise, ``to_out`` is ``out_proj``),
and ``q_proj.lora_linear_layer.up.weight`` is ``q_proj.lora_B.weight``.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from diffblocks.components.lora.formats import PREFIXES, Naming

DENOISER = "denoiser"
"""The component key under which :func:`split_by_model` gives the denoiser's part of a file."""

TEXT_ENCODER_PREFIXES: Mapping[str, tuple[str, Naming]] = {
    "text_encoder.": ("text_encoder", "dotted"),
    "text_encoder_2.": ("text_encoder_2", "dotted"),
    "lora_te_": ("text_encoder", "flat"),
    "lora_te1_": ("text_encoder", "flat"),
    "lora_te2_": ("text_encoder_2", "flat"),
    "lora_te3_": ("text_encoder_2", "flat"),
    "text_encoders.clip_l.transformer.": ("text_encoder", "dotted"),
    "text_encoders.t5xxl.transformer.": ("text_encoder_2", "dotted"),
}
"""A text-encoder key's prefix -> the pipeline component it is for, and how it names layers."""

OLD_DIFFUSERS_PARTS: Mapping[str, str] = {
    **{f".to_{x}_lora.{part}.weight": f".{x}_proj.lora_{ab}.weight" for x in "qkv" for part, ab in (("down", "A"), ("up", "B"))},
    **{f".to_out_lora.{part}.weight": f".out_proj.lora_{ab}.weight" for part, ab in (("down", "A"), ("up", "B"))},
    ".lora_linear_layer.down.weight": ".lora_A.weight",
    ".lora_linear_layer.up.weight": ".lora_B.weight",
}
"""diffusers' attention-processor LoRA parts (before PEFT) -> the PEFT parts they are."""


def split_by_model(state_dict: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """The file's tensors by the model they are for: a text encoder's component name, or :data:`DENOISER`.

    Keys of no text encoder's prefix go to the denoiser, whose conversion names any that fit none
    of its layers.
    """
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state_dict.items():
        prefix = next((p for p in TEXT_ENCODER_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            parts.setdefault(DENOISER, {})[key] = tensor
            continue
        for old, new in OLD_DIFFUSERS_PARTS.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
                break
        parts.setdefault(TEXT_ENCODER_PREFIXES[prefix][0], {})[key] = tensor
    return parts


def prefixes_of(component: str) -> Mapping[str, Naming]:
    """The prefixes a model's keys may have: the denoiser's, or a text encoder's from :data:`TEXT_ENCODER_PREFIXES`."""
    if component == DENOISER:
        return PREFIXES
    return {prefix: naming for prefix, (name, naming) in TEXT_ENCODER_PREFIXES.items() if name == component}


__all__ = ["DENOISER", "OLD_DIFFUSERS_PARTS", "TEXT_ENCODER_PREFIXES", "prefixes_of", "split_by_model"]
