"""Prompt encoding for the tiny model: BERT token states plus their padding mask, for cross-attention."""

from __future__ import annotations

from pydantic import Field
from transformers import BertModel, PreTrainedTokenizerBase

from diffblocks.blocks.block import Block, BlockConfig, BlockIO, component, known
from diffblocks.blocks.sd.encode import Prompt, as_list, check_prompts, paired
from diffblocks.components.denoisers import Conditioning
from diffblocks.presets.tiny.text_encoder import TEXT_MAX_LENGTH, encode_prompts


class EncodeBertPrompt(Block):
    """Encode the prompt and the negative prompt with a BERT encoder (all-MiniLM-L6-v2 for the tiny model).

    The conditioning is the last hidden states ``(batch, max_length, hidden)`` and the boolean
    mask of the padded tokens (``prompt_mask``), which the UNet's cross-attention applies. The empty
    prompt is the unconditional input, as in training (caption dropout replaced captions by "").
    """

    class Inputs(BlockIO):
        prompt: Prompt = Field(description="what to draw; a list makes a batch")
        negative_prompt: Prompt | None = Field(None, description="what to steer away from (default: empty)")
        num_images_per_prompt: int = Field(1, ge=1, le=64)

    class Outputs(BlockIO):
        conditioning: Conditioning
        negative_conditioning: Conditioning
        batch_size: int

    class Config(BlockConfig):
        max_length: int = Field(TEXT_MAX_LENGTH, ge=2, description="tokens per prompt, [CLS] and [SEP] included")

    text_encoder: BertModel = component()
    tokenizer: PreTrainedTokenizerBase = component()

    def check(self, inputs: Inputs) -> None:
        check_prompts(known(inputs, "prompt"), known(inputs, "negative_prompt"))

    def __call__(self, inputs: Inputs) -> Outputs:
        prompts = as_list(inputs.prompt)
        negative = paired(inputs.negative_prompt, [""] * len(prompts), len(prompts))
        n = inputs.num_images_per_prompt
        return self.Outputs(
            conditioning=self._encode(prompts, n),
            negative_conditioning=self._encode(negative, n),
            batch_size=len(prompts) * n,
        )

    def _encode(self, texts: list[str], n: int) -> Conditioning:
        max_length = self.config.max_length
        features = encode_prompts(texts, tokenizer=self.tokenizer, model=self.text_encoder, max_length=max_length)
        return Conditioning(features.tokens.repeat_interleave(n, dim=0), prompt_mask=features.mask.repeat_interleave(n, dim=0))
