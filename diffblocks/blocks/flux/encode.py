"""Flux.1 prompt encoding: the pooled CLIP vector plus T5 token embeddings, for the prompt and the negative."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor
from transformers import CLIPTextModel, PreTrainedTokenizerBase, T5EncoderModel

from diffblocks.blocks.block import Block, BlockIO, component, known
from diffblocks.blocks.errors import FieldError
from diffblocks.blocks.sd.encode import Prompt, as_list, clip_embeddings, paired
from diffblocks.components.denoisers import Conditioning
from diffblocks.components.memory import execution_device


def t5_embeddings(
    encoder: T5EncoderModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], *, max_sequence_length: int
) -> Tensor:
    """T5 last hidden states of ``texts``, padded or truncated to ``max_sequence_length`` tokens, in the encoder's dtype.

    No attention mask is passed (pad tokens are encoded like words), as diffusers' Flux pipelines encode prompts.
    """
    device = execution_device(encoder) or next(encoder.parameters()).device  # under offload: where it runs
    ids = tokenizer(texts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt").input_ids
    return encoder(ids.to(device))[0].to(encoder.dtype)


def check_flux_prompts(inputs: BlockIO) -> None:
    """Every prompt list must pair one-to-one with ``prompt`` (a single string is used for every prompt)."""
    prompt = known(inputs, "prompt")
    if prompt is None:
        return  # made by an earlier block: not known before the run
    count = len(as_list(prompt))
    if not count:
        raise FieldError("prompt", "prompt is an empty list; give at least one prompt")
    for name in ("prompt_2", "negative_prompt", "negative_prompt_2"):
        value = known(inputs, name)
        if isinstance(value, list) and len(value) not in (1, count):
            raise FieldError(name, f"{name} has {len(value)} entries but prompt has {count}; give one per prompt (or one for all)")


class FluxEncodePrompt(Block):
    """Encode prompts for Flux.1: CLIP's pooled output (from ``prompt``) and T5's token embeddings (from ``prompt_2``).

    The negative prompt is encoded only when given; it feeds true classifier-free guidance.
    The conditioning's ``prompt_embeds`` are the T5 tokens ``(batch, max_sequence_length, t5_dim)`` and its
    ``pooled_embeds`` the CLIP vector ``(batch, clip_dim)``, each prompt repeated ``num_images_per_prompt``
    times; the token positions are added by ``PrepareFluxGuidance``.
    """

    class Inputs(BlockIO):
        prompt: Prompt = Field(description="what to draw; a list makes a batch")
        prompt_2: Prompt | None = Field(None, description="the T5 prompt (default: prompt)")
        negative_prompt: Prompt | None = Field(None, description="what true CFG steers away from (see true_cfg_scale)")
        negative_prompt_2: Prompt | None = Field(None, description="the negative T5 prompt (default: negative_prompt)")
        num_images_per_prompt: int = Field(1, ge=1, le=64)
        max_sequence_length: int

    class Outputs(BlockIO):
        conditioning: Conditioning
        negative_conditioning: Conditioning | None
        batch_size: int

    text_encoder: CLIPTextModel = component(description="CLIP ViT-L/14 text tower; only its pooled output is used")
    tokenizer: PreTrainedTokenizerBase = component()
    text_encoder_2: T5EncoderModel = component(description="T5 v1.1 XXL encoder")
    tokenizer_2: PreTrainedTokenizerBase = component()

    def check(self, inputs: Inputs) -> None:
        check_flux_prompts(inputs)

    def __call__(self, inputs: Inputs) -> Outputs:
        prompts = as_list(inputs.prompt)
        count, length = len(prompts), inputs.max_sequence_length
        conditioning = self._encode(prompts, paired(inputs.prompt_2, prompts, count), length, inputs.num_images_per_prompt)
        negative = None
        if inputs.negative_prompt is not None:
            negatives = paired(inputs.negative_prompt, [], count)
            negatives_2 = paired(inputs.negative_prompt_2, negatives, count)
            negative = self._encode(negatives, negatives_2, length, inputs.num_images_per_prompt)
        return self.Outputs(conditioning=conditioning, negative_conditioning=negative, batch_size=count * inputs.num_images_per_prompt)

    def _encode(self, clip_texts: list[str], t5_texts: list[str], length: int, repeats: int) -> Conditioning:
        _, pooled = clip_embeddings(self.text_encoder, self.tokenizer, clip_texts, clip_skip=None)
        tokens = t5_embeddings(self.text_encoder_2, self.tokenizer_2, t5_texts, max_sequence_length=length)
        return Conditioning(
            tokens.repeat_interleave(repeats, dim=0),
            pooled_embeds=pooled.to(self.text_encoder.dtype).repeat_interleave(repeats, dim=0),
        )


__all__ = ["FluxEncodePrompt", "check_flux_prompts", "t5_embeddings"]
