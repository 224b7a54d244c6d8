"""Flux IP-Adapter: the image prompt encoded once per call and added to the conditionings of guidance's passes."""

from __future__ import annotations

from dataclasses import replace

import PIL.Image
from pydantic import Field
from torch import Tensor
from transformers import CLIPVisionModelWithProjection

from diffblocks.blocks.block import Block, BlockIO, component, known
from diffblocks.blocks.errors import FieldError
from diffblocks.blocks.fields import produced
from diffblocks.blocks.sd.encode import Prompt
from diffblocks.blocks.standard.images import ImageLike, check_image
from diffblocks.blocks.standard.ip_adapter import MSG_COUNT, clip_pixels, per_adapter
from diffblocks.blocks.standard.latents import placement
from diffblocks.components.denoisers import Conditioning
from diffblocks.components.models.ip_adapter import FluxIPAdapterModel, MultiFluxIPAdapterModel, flux_ip_adapters

_MSG_NO_ENCODER = (
    "{field} is given but no image encoder is loaded to encode it: load one with "
    "pipe.load_ip_adapter(..., image_encoder=...) (XLabs' adapter reads openai/clip-vit-large-patch14), "
    "or pass {field}_embeds"
)
_MSG_BOTH = "give {field} or {field}_embeds, not both"
_MSG_EMBEDS = "{field}[{i}] has shape {shape}, but IP-Adapter {i} reads (images, {dim}): the image encoder's image_embeds of its images"
_MSG_COUNTS = (
    "IP-Adapter {i} has {positive} images in ip_adapter_image but {negative} in negative_ip_adapter_image: the prompt's "
    "and the negative prompt's passes run as one batch, so give as many negative images, or one"
)
_MSG_MISSING = (
    "{field} is not given (for IP-Adapter {i}), and its default, the image encoder's embedding of a black picture, "
    "needs an image encoder, which is not loaded: pass {field}_embeds (the negative one is read by the negative "
    "prompt's pass, under true CFG)"
)


class EncodeFluxImagePrompt(Block):
    """Encode the image prompt of each Flux IP-Adapter and add its tokens to the conditionings as ``image_embeds``.

    As diffusers' ``FluxPipeline`` does: ``ip_adapter_image`` is preprocessed as by
    ``CLIPImageProcessor`` (:func:`~diffblocks.blocks.standard.ip_adapter.clip_pixels`) and encoded
    to the CLIP image embedding; ``ip_adapter_image_embeds`` skips the encoder. The negative prompt's
    pass (true CFG) reads ``negative_ip_adapter_image`` (or its embeddings), by default the
    embedding of a black picture; when only the negative is given, the prompt's pass reads the
    black picture instead. Each adapter's projection runs once per call; its tokens (of all its
    images, joined) are repeated to the run's batch.

    With several IP-Adapters (a :class:`MultiFluxIPAdapterModel`), each input is a list with one entry per adapter.
    """

    class Inputs(BlockIO):
        ip_adapter_image: ImageLike | list[ImageLike] | None = Field(
            None, description="the image prompt: an image or a list of them; a list of one per IP-Adapter for several"
        )
        ip_adapter_image_embeds: list[Tensor] | None = Field(
            None, description="the image encoder's image_embeds of the image prompt, (images, embed), one tensor per IP-Adapter"
        )
        negative_ip_adapter_image: ImageLike | list[ImageLike] | None = Field(
            None, description="what the negative prompt's pass (true CFG) reads instead (default: a black picture)"
        )
        negative_ip_adapter_image_embeds: list[Tensor] | None = Field(
            None, description="the negative image prompt's image_embeds, shaped as ip_adapter_image_embeds"
        )
        negative_prompt: Prompt | None = Field(None, description="what true CFG steers away from (see true_cfg_scale)")
        conditioning: Conditioning = produced(description="the prompt's embeddings")
        negative_conditioning: Conditioning | None = produced(description="the negative prompt's embeddings")

    class Outputs(BlockIO):
        conditioning: Conditioning
        negative_conditioning: Conditioning | None

    ip_adapter: FluxIPAdapterModel | MultiFluxIPAdapterModel = component(description="the Flux IP-Adapter, or several")
    image_encoder: CLIPVisionModelWithProjection = component(optional=True, description="encodes ip_adapter_image")

    def check(self, inputs: Inputs) -> None:
        n = len(flux_ip_adapters(self.ip_adapter))
        for field in ("ip_adapter_image", "negative_ip_adapter_image"):
            image, embeds = known(inputs, field), known(inputs, f"{field}_embeds")
            if image is not None and embeds is not None:
                raise FieldError(f"{field}_embeds", _MSG_BOTH.format(field=field))
            if image is not None:
                if self.image_encoder is None:
                    raise FieldError(field, _MSG_NO_ENCODER.format(field=field))
                for item in per_adapter(image, n, field):
                    check_image(item, name=field)
            if embeds is not None:
                self.check_embeds(embeds, f"{field}_embeds")
        if self.image_encoder is None:  # a side not given defaults to a black picture, which needs the encoder
            sides = {field: known(inputs, field) is not None or known(inputs, f"{field}_embeds") is not None
                     for field in ("ip_adapter_image", "negative_ip_adapter_image")}  # fmt: skip
            if sides["negative_ip_adapter_image"] and not sides["ip_adapter_image"]:
                raise FieldError("ip_adapter_image_embeds", _MSG_MISSING.format(i=0, field="ip_adapter_image"))
            if sides["ip_adapter_image"] and not sides["negative_ip_adapter_image"] and known(inputs, "negative_prompt") is not None:
                raise FieldError("negative_ip_adapter_image_embeds", _MSG_MISSING.format(i=0, field="negative_ip_adapter_image"))

    def check_embeds(self, embeds: list[Tensor], field: str) -> None:
        """Refuse embeddings of another count or shape than the adapters read, naming both."""
        adapters = flux_ip_adapters(self.ip_adapter)
        if len(embeds) != len(adapters):
            raise FieldError(field, MSG_COUNT.format(field=field, n=len(adapters), got=f"a list of {len(embeds)}"))
        for i, (adapter, tensor) in enumerate(zip(adapters, embeds, strict=True)):
            if tensor.ndim != 2 or tensor.shape[-1] != adapter.embed_dim:
                raise FieldError(field, _MSG_EMBEDS.format(field=field, i=i, shape=tuple(tensor.shape), dim=adapter.embed_dim))

    def __call__(self, inputs: Inputs) -> Outputs:
        cond, uncond = inputs.conditioning, inputs.negative_conditioning
        given = [inputs.ip_adapter_image, inputs.ip_adapter_image_embeds, inputs.negative_ip_adapter_image, inputs.negative_ip_adapter_image_embeds]
        if all(value is None for value in given):
            return self.Outputs(conditioning=cond, negative_conditioning=uncond)
        positive, negative = [], []
        for i, adapter in enumerate(flux_ip_adapters(self.ip_adapter)):
            features = self.features(inputs.ip_adapter_image, inputs.ip_adapter_image_embeds, i, "ip_adapter_image")
            if uncond is not None:  # only the negative prompt's pass reads it (true CFG)
                zero = self.features(inputs.negative_ip_adapter_image, inputs.negative_ip_adapter_image_embeds, i, "negative_ip_adapter_image")
                features, zero = _same_count(features, zero, i)
                negative.append(adapter.project(zero[None]).repeat(uncond.batch_size, 1, 1))
            positive.append(adapter.project(features[None]).repeat(cond.batch_size, 1, 1))
        return self.Outputs(
            conditioning=replace(cond, image_embeds=tuple(positive)),
            negative_conditioning=None if uncond is None else replace(uncond, image_embeds=tuple(negative)),
        )

    def features(self, image: ImageLike | list[ImageLike] | None, embeds: list[Tensor] | None, i: int, field: str) -> Tensor:
        """The ``(images, embed)`` image embeddings adapter ``i`` reads from ``field``: given, encoded, or a black picture's."""
        if embeds is not None:
            return embeds[i]
        if self.image_encoder is None:  # check() refused an image without an encoder: this is the side not given
            raise FieldError(f"{field}_embeds", _MSG_MISSING.format(i=i, field=field))
        size = int(self.image_encoder.config.image_size)
        if image is None:  # diffusers' default for the side not given: a black picture
            picture: ImageLike = PIL.Image.new("RGB", (size, size))
        else:
            picture = per_adapter(image, len(flux_ip_adapters(self.ip_adapter)), field)[i]
        device, dtype = placement(self.image_encoder)
        return self.image_encoder(clip_pixels(picture, size=size).to(device=device, dtype=dtype)).image_embeds


def _same_count(features: Tensor, zero: Tensor, i: int) -> tuple[Tensor, Tensor]:
    """The prompt's and the negative's image embeddings with as many images each, so that their passes batch.

    The side with fewer images is tiled: attending to a set of keys and values repeated k times is
    attending to the set (each copy takes an equal share of the weights), so the images come out as
    diffusers' separate passes make them (a black picture against two images, by default).
    """
    small, large = sorted((features.shape[0], zero.shape[0]))
    if small == large:
        return features, zero
    if large % small:
        raise FieldError("negative_ip_adapter_image", _MSG_COUNTS.format(i=i, positive=features.shape[0], negative=zero.shape[0]))
    return features.repeat(large // features.shape[0], 1), zero.repeat(large // zero.shape[0], 1)


__all__ = ["EncodeFluxImagePrompt"]
