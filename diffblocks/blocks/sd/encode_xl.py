"""SDXL prompt encoding: two CLIP encoders side by side, and the pooled text embedding of the second."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerBase

from diffblocks.blocks.block import Block, BlockConfig, BlockIO, component, known
from diffblocks.blocks.errors import FieldError
from diffblocks.blocks.sd.encode import Prompt, as_list, check_clip_skip, check_prompts, clip_embeddings, paired
from diffblocks.components.denoisers import Conditioning


class EncodePromptXL(Block):
    """Encode prompts with SDXL's two CLIP encoders (Podell et al. 2023).

    The penultimate hidden states of both encoders are concatenated along the features
    (``prompt_embeds``, e.g. 768 + 1280 = 2048 wide); the projected pooled output of the second
    encoder is ``pooled_embeds`` (the UNet's ``text_embeds``). Without a negative prompt, the negative embeddings are zeros
    when ``force_zeros_for_empty_prompt`` is set (SDXL base), else the encoding of ``""``.
    """

    class Inputs(BlockIO):
        prompt: Prompt = Field(description="what to draw; a list makes a batch")
        prompt_2: Prompt | None = Field(None, description="the second encoder's prompt (default: prompt)")
        negative_prompt: Prompt | None = Field(None, description="what to steer away from")
        negative_prompt_2: Prompt | None = Field(None, description="the second encoder's negative (default: negative_prompt)")
        num_images_per_prompt: int = Field(1, ge=1, le=64)
        clip_skip: int | None = Field(None, ge=0, description="skip this many more layers before the penultimate one")

    class Outputs(BlockIO):
        conditioning: Conditioning
        negative_conditioning: Conditioning
        batch_size: int

    class Config(BlockConfig):
        force_zeros_for_empty_prompt: bool = True

    text_encoder: CLIPTextModel = component(optional=True, description="absent in the SDXL refiner")
    tokenizer: PreTrainedTokenizerBase = component(optional=True)
    text_encoder_2: CLIPTextModelWithProjection = component()
    tokenizer_2: PreTrainedTokenizerBase = component()

    def check(self, inputs: Inputs) -> None:
        prompt = known(inputs, "prompt")
        check_prompts(prompt, known(inputs, "negative_prompt"))
        check_clip_skip(known(inputs, "clip_skip"), [self.text_encoder, self.text_encoder_2], penultimate=True)
        if prompt is None:
            return
        count = len(as_list(prompt))
        for name in ("prompt_2", "negative_prompt_2"):
            value = known(inputs, name)
            if isinstance(value, list) and len(value) != count:
                raise FieldError(name, f"{name} has {len(value)} entries but prompt has {count}; give one per prompt")

    def __call__(self, inputs: Inputs) -> Outputs:
        prompts = as_list(inputs.prompt)
        count, n = len(prompts), inputs.num_images_per_prompt
        embeds, pooled = self._encode(prompts, paired(inputs.prompt_2, prompts, count), clip_skip=inputs.clip_skip)
        if inputs.negative_prompt is None and inputs.negative_prompt_2 is None and self.config.force_zeros_for_empty_prompt:
            negative_embeds, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            negative = paired(inputs.negative_prompt, [""] * count, count)
            negative_embeds, negative_pooled = self._encode(negative, paired(inputs.negative_prompt_2, negative, count))
        dtype = self.text_encoder_2.dtype
        return self.Outputs(
            conditioning=_conditioning(embeds, pooled, n, dtype),
            negative_conditioning=_conditioning(negative_embeds, negative_pooled, n, dtype),
            batch_size=count * n,
        )

    def _encode(self, texts: list[str], texts_2: list[str], *, clip_skip: int | None = None) -> tuple[Tensor, Tensor]:
        """Penultimate hidden states of both encoders side by side, and the second encoder's pooled output."""
        hidden = []
        if self.text_encoder is not None and self.tokenizer is not None:
            hidden.append(clip_embeddings(self.text_encoder, self.tokenizer, texts, clip_skip=clip_skip, penultimate=True)[0])
        states, pooled = clip_embeddings(self.text_encoder_2, self.tokenizer_2, texts_2, clip_skip=clip_skip, penultimate=True)
        hidden.append(states.to(hidden[0].device) if hidden else states)
        return torch.cat(hidden, dim=-1), pooled


def _conditioning(embeds: Tensor, pooled: Tensor, n: int, dtype: torch.dtype) -> Conditioning:
    return Conditioning(embeds.to(dtype).repeat_interleave(n, dim=0), pooled_embeds=pooled.to(dtype).repeat_interleave(n, dim=0))


__all__ = ["EncodePromptXL"]
