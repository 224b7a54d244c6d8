"""IP-Adapter blocks: the image prompt encoded once per call and added to the conditionings of guidance's passes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor
from transformers import CLIPVisionModelWithProjection

from diffblocks.blocks.block import Block, BlockIO, component, known
from diffblocks.blocks.errors import FieldError
from diffblocks.blocks.fields import produced
from diffblocks.blocks.standard.images import ImageLike, check_image, image_size, to_tensor
from diffblocks.blocks.standard.latents import placement
from diffblocks.components.denoisers import Conditioning
from diffblocks.components.models.ip_adapter import IPAdapterModel, MultiIPAdapterModel, ip_adapters

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MSG_NO_ENCODER = (
    "ip_adapter_image is given but no image encoder is loaded to encode it: load one with "
    "pipe.load_ip_adapter(..., image_encoder=CLIPVisionModelWithProjection...) or pass ip_adapter_image_embeds"
)
_MSG_BOTH = "give ip_adapter_image or ip_adapter_image_embeds, not both"
MSG_COUNT = "{field} must be a list of {n} entries, one per IP-Adapter (each an image or a list of images), got {got}"
_MSG_EMBEDS = (
    "{field}[{i}] has shape {shape}, but IP-Adapter {i} reads {what}: give the image encoder's {source} "
    "of its images with that shape"
)
_MSG_NEGATIVE_SHAPE = (
    "{field}[{i}] has shape {got} but the image prompt's features have {want}: "
    "give one negative per image, of the same shape"
)
_MSG_NEGATIVE_CLIP = (
    "negative_ip_adapter_clip_embeds is needed for IP-Adapter {i} (FaceID-Plus): the negative of its CLIP hidden states "
    "is the image encoder's output for all-zero pixels, and no image encoder is loaded to make it"
)
_MSG_FACE_IMAGE = (
    "ip_adapter_image is given but IP-Adapter {i} is a FaceID adapter: it reads a face-recognition embedding, not a "
    "picture. Compute the face embeddings with insightface (FaceAnalysis, 'buffalo_l': face.normed_embedding) and pass "
    "them as ip_adapter_image_embeds=[...], adapter {i}'s entry a tensor of shape (images, {dim})"
)
_MSG_FACE_EMBEDS = (
    "{field}[{i}] has shape {shape}, but IP-Adapter {i} is a FaceID adapter and reads (images, {dim}): one "
    "insightface face embedding (face.normed_embedding) per image"
)
_MSG_CLIP = (
    "{field} is needed for IP-Adapter {i}, a FaceID-Plus adapter: it also reads the CLIP image encoder's penultimate "
    "hidden states of the face crops, one (images, seq, {dim}) tensor (entry {i} of a list with one entry per adapter, None for the others)"
)
_MSG_NOT_PLUS = "{what}, but only FaceID-Plus IP-Adapters read CLIP features of faces and the shortcut scale (PlusV2)"
_MSG_CLIP_SHAPE = (
    "{field}[{i}] has shape {shape}, but IP-Adapter {i} (FaceID-Plus) reads ({images}, seq, {dim}): the CLIP image "
    "encoder's penultimate hidden states of each face crop, one per face embedding"
)
_MSG_NEGATIVE = (
    "negative_ip_adapter_image_embeds is needed for IP-Adapter {i}: it reads hidden states, whose negative is "
    "the image encoder's output for all-zero pixels, and no image encoder is loaded to make it"
)


def clip_pixels(image: ImageLike, *, size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Tensor:
    """``(images, 3, size, size)`` CLIP input: what transformers' ``CLIPImageProcessor`` makes, in torch.

    The shorter side is resized to ``size`` (bicubic, antialiased), the centre cut to a square, and
    the channels normalised by ``mean`` and ``std``. An image already ``size`` square is only
    normalised, exactly as the processor does it; a resized one differs from PIL's bicubic by
    about 0.3 levels of 255 on average (a few at sharp edges).
    """
    items = image if isinstance(image, list) else [image]
    out = []
    for item in items:
        height, width = image_size(item)
        for pixels in to_tensor(item, height=height, width=width):
            short, long_ = min(height, width), max(height, width)
            if short != size:
                scaled = (size, int(size * long_ / short))
                pixels = F.interpolate(pixels[None], size=scaled if height <= width else scaled[::-1], mode="bicubic", antialias=True)[0]
            h, w = pixels.shape[-2:]
            top, left = (h - size) // 2, (w - size) // 2
            pixels = pixels[:, top : top + size, left : left + size].clamp(0, 1)
            out.append((pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
    return torch.stack(out)


class EncodeImagePrompt(Block):
    """Encode the image prompt of each IP-Adapter and add its tokens to the conditionings as ``image_embeds``.

    With the image encoder (a ``CLIPVisionModelWithProjection``), ``ip_adapter_image`` is
    preprocessed as by ``CLIPImageProcessor`` (:func:`clip_pixels`) and encoded: the plain
    IP-Adapter reads the projected image embedding, the plus and full-face ones the penultimate
    hidden states. ``ip_adapter_image_embeds`` skips the encoder. The unconditional pass gets what
    diffusers gives it: zero embeddings, or the hidden states of all-zero (normalised) pixels
    (``negative_ip_adapter_image_embeds`` overrides them). Each adapter's projection runs once per
    call; its tokens (of all its images, joined) are repeated to the run's batch, so every prompt
    and image per prompt sees the same image prompt.

    FaceID adapters read insightface face embeddings, given as ``ip_adapter_image_embeds``
    (``ip_adapter_image`` is refused, naming the shape); FaceID-Plus also reads CLIP's hidden
    states of the face crops (``ip_adapter_clip_embeds``; their negative: the encoder's for all-zero
    pixels) and, as PlusV2, adds its identity tokens at ``ip_adapter_shortcut_scale``.

    With several IP-Adapters (a :class:`MultiIPAdapterModel`), each input is a list with one entry per adapter.
    """

    class Inputs(BlockIO):
        ip_adapter_image: ImageLike | list[ImageLike] | None = Field(
            None, description="the image prompt: an image or a list of them; a list of one per IP-Adapter for several"
        )
        ip_adapter_image_embeds: list[Tensor] | None = Field(
            None,
            description="the image encoder's output for the image prompt, one tensor per IP-Adapter: "
            "(images, embed) image embeddings for the plain IP-Adapter, (images, seq, hidden) hidden states for plus",
        )
        negative_ip_adapter_image_embeds: list[Tensor] | None = Field(
            None, description="what the unconditional pass reads instead, shaped as ip_adapter_image_embeds"
        )
        ip_adapter_clip_embeds: list[Tensor | None] | None = Field(
            None,
            description="FaceID-Plus: the image encoder's penultimate hidden states of the face crops, (images, seq, hidden), "
            "one entry per IP-Adapter (None for those of other kinds)",
        )
        negative_ip_adapter_clip_embeds: list[Tensor | None] | None = Field(
            None, description="what the unconditional pass of FaceID-Plus reads instead; default: the encoder's output for all-zero pixels"
        )
        ip_adapter_shortcut_scale: float | None = Field(
            None,
            description="FaceID-PlusV2: the identity tokens are added to the output at this scale (the original's s_scale); None for Plus",
        )
        conditioning: Conditioning = produced(description="the prompt's embeddings")
        negative_conditioning: Conditioning = produced(description="the negative prompt's embeddings")

    class Outputs(BlockIO):
        conditioning: Conditioning
        negative_conditioning: Conditioning

    ip_adapter: IPAdapterModel | MultiIPAdapterModel = component(description="the IP-Adapter, or several")
    image_encoder: CLIPVisionModelWithProjection = component(optional=True, description="encodes ip_adapter_image")

    def check(self, inputs: Inputs) -> None:
        adapters = ip_adapters(self.ip_adapter)
        image, embeds = known(inputs, "ip_adapter_image"), known(inputs, "ip_adapter_image_embeds")
        if image is not None and embeds is not None:
            raise FieldError("ip_adapter_image_embeds", _MSG_BOTH)
        face = next((i for i, adapter in enumerate(adapters) if adapter.reads_face_embeddings), None)
        if image is not None and face is not None:
            raise FieldError("ip_adapter_image", _MSG_FACE_IMAGE.format(i=face, dim=adapters[face].embed_dim))
        if image is not None:
            if self.image_encoder is None:
                raise FieldError("ip_adapter_image", _MSG_NO_ENCODER)
            for item in per_adapter(image, len(adapters), "ip_adapter_image"):
                check_image(item, name="ip_adapter_image")
        for field in ("ip_adapter_image_embeds", "negative_ip_adapter_image_embeds"):
            given = known(inputs, field)
            if given is not None:
                self.check_embeds(given, field)
        self.check_faceid_plus(inputs, adapters)

    def check_faceid_plus(self, inputs: Inputs, adapters: tuple[IPAdapterModel, ...]) -> None:
        """Refuse FaceID-Plus's inputs missing, of another shape, or given where no FaceID-Plus adapter reads them."""
        embeds, negative = known(inputs, "ip_adapter_image_embeds"), known(inputs, "negative_ip_adapter_clip_embeds")
        plus = [i for i, adapter in enumerate(adapters) if adapter.clip_dim is not None]
        if not plus and known(inputs, "ip_adapter_shortcut_scale") is not None:
            raise FieldError("ip_adapter_shortcut_scale", _MSG_NOT_PLUS.format(what="ip_adapter_shortcut_scale is given"))
        for field, required in (("ip_adapter_clip_embeds", embeds is not None), ("negative_ip_adapter_clip_embeds", False)):
            clip = known(inputs, field)
            if clip is not None or required:
                self.check_clip_embeds(clip, embeds, field, required=required)
        if embeds is not None and self.image_encoder is None:
            for i in plus:
                if negative is None or negative[i] is None:
                    raise FieldError("negative_ip_adapter_clip_embeds", _MSG_NEGATIVE_CLIP.format(i=i))

    def check_clip_embeds(self, clip: list[Tensor | None] | None, embeds: list[Tensor] | None, field: str, *, required: bool) -> None:
        """Refuse FaceID-Plus's CLIP hidden states missing, of another count or shape than its face embeddings, or given for another kind."""
        adapters = ip_adapters(self.ip_adapter)
        if clip is not None and len(clip) != len(adapters):
            raise FieldError(field, MSG_COUNT.format(field=field, n=len(adapters), got=f"a list of {len(clip)}"))
        for i, adapter in enumerate(adapters):
            tensor = None if clip is None else clip[i]
            if adapter.clip_dim is None:
                if tensor is not None:
                    raise FieldError(field, _MSG_NOT_PLUS.format(what=f"{field}[{i}] is given for IP-Adapter {i}") + ": give None for it")
                continue
            if tensor is None:
                if required:
                    raise FieldError(field, _MSG_CLIP.format(field=field, i=i, dim=adapter.clip_dim))
                continue
            images = tensor.shape[0] if embeds is None else embeds[i].shape[0]
            if tensor.ndim != 3 or tensor.shape[0] != images or tensor.shape[-1] != adapter.clip_dim:
                shape = tuple(tensor.shape)
                raise FieldError(field, _MSG_CLIP_SHAPE.format(field=field, i=i, shape=shape, images=images, dim=adapter.clip_dim))

    def check_embeds(self, embeds: list[Tensor], field: str) -> None:
        """Refuse embeddings of another count or shape than the adapters read, naming both."""
        adapters = ip_adapters(self.ip_adapter)
        if len(embeds) != len(adapters):
            raise FieldError(field, MSG_COUNT.format(field=field, n=len(adapters), got=f"a list of {len(embeds)}"))
        for i, (adapter, tensor) in enumerate(zip(adapters, embeds, strict=True)):
            rank = 3 if adapter.reads_hidden_states else 2
            if adapter.reads_face_embeddings and (tensor.ndim != 2 or tensor.shape[-1] != adapter.embed_dim):
                raise FieldError(field, _MSG_FACE_EMBEDS.format(field=field, i=i, shape=tuple(tensor.shape), dim=adapter.embed_dim))
            if tensor.ndim != rank or tensor.shape[-1] != adapter.embed_dim:
                what = f"({'images, seq' if rank == 3 else 'images'}, {adapter.embed_dim})"
                source = "penultimate hidden states" if rank == 3 else "image_embeds"
                raise FieldError(field, _MSG_EMBEDS.format(field=field, i=i, shape=tuple(tensor.shape), what=what, source=source))

    def __call__(self, inputs: Inputs) -> Outputs:
        cond, uncond = inputs.conditioning, inputs.negative_conditioning
        adapters = ip_adapters(self.ip_adapter)
        if inputs.ip_adapter_image is None and inputs.ip_adapter_image_embeds is None:
            return self.Outputs(conditioning=cond, negative_conditioning=uncond)
        positive, negative = [], []
        for i, adapter in enumerate(adapters):
            features, zero = self.features(inputs, i, adapter)
            if zero.shape != features.shape:
                field, got, want = "negative_ip_adapter_image_embeds", tuple(zero.shape), tuple(features.shape)
                raise FieldError(field, _MSG_NEGATIVE_SHAPE.format(field=field, i=i, got=got, want=want))
            clip, clip_zero = self.clip_features(inputs, i, adapter)
            shortcut = inputs.ip_adapter_shortcut_scale
            positive.append(adapter.project(features[None], clip=clip, shortcut_scale=shortcut).repeat(cond.batch_size, 1, 1))
            negative.append(adapter.project(zero[None], clip=clip_zero, shortcut_scale=shortcut).repeat(uncond.batch_size, 1, 1))
        return self.Outputs(
            conditioning=replace(cond, image_embeds=tuple(positive)),
            negative_conditioning=replace(uncond, image_embeds=tuple(negative)),
        )

    def features(self, inputs: Inputs, i: int, adapter: IPAdapterModel) -> tuple[Tensor, Tensor]:
        """The image features adapter ``i`` reads, and its unconditional ones: ``(images, ...)`` each."""
        n = len(ip_adapters(self.ip_adapter))
        negatives = inputs.negative_ip_adapter_image_embeds
        if inputs.ip_adapter_image_embeds is not None:
            features = inputs.ip_adapter_image_embeds[i]
            zero = None if negatives is None else negatives[i]
            if zero is None and adapter.reads_hidden_states:
                if self.image_encoder is None:
                    raise FieldError("negative_ip_adapter_image_embeds", _MSG_NEGATIVE.format(i=i))
                zero = self.encode(torch.zeros(features.shape[0], 3, *self.pixel_size()), hidden=True)
            return features, torch.zeros_like(features) if zero is None else zero
        assert self.image_encoder is not None and inputs.ip_adapter_image is not None  # check() refused it otherwise
        image = per_adapter(inputs.ip_adapter_image, n, "ip_adapter_image")[i]
        size = self.pixel_size()[0]
        pixels = clip_pixels(image, size=size)
        features = self.encode(pixels, hidden=adapter.reads_hidden_states)
        if negatives is not None:
            return features, negatives[i]
        if adapter.reads_hidden_states:
            return features, self.encode(torch.zeros_like(pixels), hidden=True)
        return features, torch.zeros_like(features)

    def clip_features(self, inputs: Inputs, i: int, adapter: IPAdapterModel) -> tuple[Tensor | None, Tensor | None]:
        """FaceID-Plus: the CLIP hidden states of the faces adapter ``i`` reads, and its unconditional ones.

        Each ``(1, images, seq, hidden)``; ``(None, None)`` for the other kinds.
        """
        if adapter.clip_dim is None:
            return None, None
        assert inputs.ip_adapter_clip_embeds is not None  # check() refused it otherwise
        clip = inputs.ip_adapter_clip_embeds[i]
        assert clip is not None
        negatives = inputs.negative_ip_adapter_clip_embeds
        zero = None if negatives is None else negatives[i]
        if zero is None:
            if self.image_encoder is None:
                raise FieldError("negative_ip_adapter_clip_embeds", _MSG_NEGATIVE_CLIP.format(i=i))
            zero = self.encode(torch.zeros(clip.shape[0], 3, *self.pixel_size()), hidden=True)
        if zero.shape != clip.shape:
            field, got, want = "negative_ip_adapter_clip_embeds", tuple(zero.shape), tuple(clip.shape)
            raise FieldError(field, _MSG_NEGATIVE_SHAPE.format(field=field, i=i, got=got, want=want))
        return clip[None], zero[None]

    def pixel_size(self) -> tuple[int, int]:
        assert self.image_encoder is not None
        size = int(self.image_encoder.config.image_size)
        return size, size

    def encode(self, pixels: Tensor, *, hidden: bool) -> Tensor:
        """The image encoder's image embeddings, or its penultimate hidden states with ``hidden``."""
        assert self.image_encoder is not None
        device, dtype = placement(self.image_encoder)
        out = self.image_encoder(pixels.to(device=device, dtype=dtype), output_hidden_states=hidden)
        return out.hidden_states[-2] if hidden else out.image_embeds


def per_adapter(value: ImageLike | Sequence[ImageLike], n: int, field: str) -> list[ImageLike]:
    """The image prompt of each adapter: the value itself for one adapter (a list is several images), its entries for several."""
    if n == 1:
        return [cast(ImageLike, value)]
    if not isinstance(value, list) or len(value) != n:
        got = f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
        raise FieldError(field, MSG_COUNT.format(field=field, n=n, got=got))
    return value


__all__ = ["CLIP_MEAN", "CLIP_STD", "MSG_COUNT", "EncodeImagePrompt", "clip_pixels", "per_adapter"]
