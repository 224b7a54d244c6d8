"""CLIP prompt encoding for Stable Diffusion 1.x/2.x, with negative prompts and several images per prompt."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from diffblocks.blocks.block import Block, BlockIO, component, known
from diffblocks.blocks.errors import FieldError
from diffblocks.components.denoisers import Conditioning
from diffblocks.components.memory import execution_device
from diffblocks.components.textual_inversion import expand_prompt

Prompt = str | list[str]


def as_list(prompt: Prompt) -> list[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt)


def paired(texts: Prompt | None, fallback: list[str], count: int) -> list[str]:
    """``texts`` as one string per prompt: None takes ``fallback``, a single string is used for every prompt."""
    if texts is None:
        return fallback
    items = as_list(texts)
    return items * count if len(items) == 1 and count > 1 else items


def check_prompts(prompt: Prompt | None, negative: Prompt | None) -> None:
    """A negative prompt list must pair one-to-one with the prompt list."""
    if prompt is None:
        return  # made by an earlier block: not known before the run
    prompts = as_list(prompt)
    if not prompts:
        raise FieldError("prompt", "prompt is an empty list; give at least one prompt")
    if isinstance(negative, list) and len(negative) != len(prompts):
        raise FieldError(
            "negative_prompt", f"negative_prompt has {len(negative)} entries but prompt has {len(prompts)}; give one per prompt"
        )


def check_clip_skip(clip_skip: int | None, encoders: list[torch.nn.Module | None], *, penultimate: bool = False) -> None:
    """``clip_skip`` must name a layer every encoder has (the penultimate layer counts as one skipped; 0 layers left is the embeddings)."""
    if clip_skip is None:
        return
    for encoder in encoders:
        layers = getattr(getattr(encoder, "config", None), "num_hidden_layers", None)
        if not isinstance(layers, int):
            continue
        most = layers - 1 if penultimate else layers
        if clip_skip > most:
            raise FieldError(
                "clip_skip",
                f"clip_skip {clip_skip} skips more layers than the text encoder has ({layers} layers"
                f"{', the penultimate one already used' if penultimate else ''}); give 0 to {most}, or leave it out",
            )


def clip_embeddings(
    encoder: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], *, clip_skip: int | None, penultimate: bool = False
) -> tuple[Tensor, Tensor]:
    """Token embeddings (and the encoder's pooled output) of ``texts``, padded to the tokenizer's length.

    ``clip_skip`` takes the output of an earlier layer, through the final layer norm, as SD 1.x
    does; ``penultimate`` takes the second-to-last layer without the norm, as SDXL does.
    """
    device = execution_device(encoder) or next(encoder.parameters()).device  # under offload: where it runs
    texts = [expand_prompt(text, tokenizer) for text in texts]  # multi-vector textual inversion tokens written out
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    if clip_skip is None and not penultimate:
        out = encoder(ids.to(device))
        return out[0], out[1]
    out = encoder(ids.to(device), output_hidden_states=True)
    if penultimate:
        layer = -(2 + (clip_skip or 0))
        return out.hidden_states[layer], out[0]
    assert clip_skip is not None
    hidden = out.hidden_states[-(clip_skip + 1)]
    return encoder.text_model.final_layer_norm(hidden), out[1]


class EncodePrompt(Block):
    """Encode the prompt and the negative prompt with CLIP (SD 1.x/2.x)."""

    class Inputs(BlockIO):
        prompt: Prompt = Field(description="what to draw; a list makes a batch")
        negative_prompt: Prompt | None = Field(None, description="what to steer away from (default: empty)")
        num_images_per_prompt: int = Field(1, ge=1, le=64)
        clip_skip: int | None = Field(None, ge=0, description="use the output of an earlier CLIP layer")

    class Outputs(BlockIO):
        conditioning: Conditioning
        negative_conditioning: Conditioning
        batch_size: int

    text_encoder: CLIPTextModel = component()
    tokenizer: PreTrainedTokenizerBase = component()

    def check(self, inputs: Inputs) -> None:
        check_prompts(known(inputs, "prompt"), known(inputs, "negative_prompt"))
        check_clip_skip(known(inputs, "clip_skip"), [self.text_encoder])

    def __call__(self, inputs: Inputs) -> Outputs:
        prompts = as_list(inputs.prompt)
        negative = paired(inputs.negative_prompt, [""] * len(prompts), len(prompts))
        n = inputs.num_images_per_prompt
        embeds, _ = clip_embeddings(self.text_encoder, self.tokenizer, prompts, clip_skip=inputs.clip_skip)
        negative_embeds, _ = clip_embeddings(self.text_encoder, self.tokenizer, negative, clip_skip=inputs.clip_skip)
        dtype = self.text_encoder.dtype
        return self.Outputs(
            conditioning=Conditioning(embeds.to(dtype).repeat_interleave(n, dim=0)),
            negative_conditioning=Conditioning(negative_embeds.to(dtype).repeat_interleave(n, dim=0)),
            batch_size=len(prompts) * n,
        )
