"""What a denoiser is conditioned on, as one typed, frozen value: prompt embeddings and their companions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import ClassVar, final

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

_MSG_RANK = "Conditioning.{field} must be {axes}, got shape {shape}"
_MSG_BATCH = "Conditioning.{field} has batch {got} but prompt_embeds has batch {batch}: every batched field needs the same"
_MSG_PRESENCE = (
    "Conditioning.{field} is set on {count} of {total} conditionings: batched guidance concatenates them, "
    "so give {field} to all of them or to none"
)
_MSG_TRAILING = (
    "Conditioning.{field} has shape {first} in the first conditioning but {other} in conditioning {index}: "
    "only the batch (the first dim) may differ between conditionings that are concatenated"
)
_MSG_SHARED = (
    "Conditioning.{field} differs between the conditionings: it is shared by every pass (no batch dim), "
    "so give each conditioning the same {field}"
)


@final
@dataclass(frozen=True, slots=True, eq=False)
class Conditioning:
    """The inputs besides the latents and the timestep that one denoiser pass is conditioned on.

    Prompt encoders fill the prompt fields; blocks that run later add what they know (SDXL's size
    conditioning adds ``time_ids``, Flux's guidance set-up adds the positional ids and the embedded
    guidance) with ``dataclasses.replace``. A family's denoiser wrapper
    (:class:`~diffblocks.components.denoisers.AbstractDenoiser`) maps the fields to its model's
    arguments; the fields a family does not use stay None.

    Batched fields (:attr:`BATCHED`) carry the batch as their first dim and are concatenated by
    :meth:`cat` when guidance runs several passes in one forward. Shared fields (:attr:`SHARED`)
    have no batch dim: every pass reads the same one. Shapes are checked once, here, and never in
    the denoising loop.

    Args:
        prompt_embeds: ``(batch, seq, dim)`` token embeddings that cross-attention (or Flux's joint
            attention) reads.
        pooled_embeds: ``(batch, dim)`` one vector per prompt: SDXL's projected CLIP output
            (the UNet's ``text_embeds``), Flux's pooled CLIP output (``pooled_projections``).
        time_ids: ``(batch, ids)`` SDXL's size and crop micro-conditioning (see ``PrepareTimeIds``).
        prompt_mask: ``(batch, seq)`` True (or 1) for the prompt tokens to attend to, False (or 0)
            for padding, for text encoders whose padding must be masked (BERT in the tiny model).
        image_embeds: one ``(batch, tokens, dim)`` tensor per IP-Adapter: the image prompt's
            projected tokens. ``EncodeImagePrompt`` fills them before guidance (the negative
            conditioning gets the unconditional ones), and the IP-Adapter attached to the UNet's
            denoiser reads them (``docs/ip_adapter.md``).
        control_residuals: ``(batch, ...)`` ControlNet residuals, one per injection point in the
            model's order (the UNet's skip connections, then its mid block; Flux's double blocks,
            then its single blocks).
            :class:`~diffblocks.components.denoisers.ControlNetDenoiser` computes them per pass
            from the latents and the control image, and hands the UNet a conditioning that
            carries them; Flux's come from :func:`~diffblocks.components.denoisers.flux_control_residuals`.
        text_ids: ``(seq, 3)`` Flux positions of the prompt tokens (shared).
        image_ids: ``(image_seq, 3)`` Flux positions of the packed latent tokens (shared).
        embedded_guidance: ``(1,)`` Flux dev's distilled guidance scale, which the transformer
            embeds like the timestep (shared).

    Example:
        >>> cond = Conditioning(torch.ones(1, 77, 8), pooled_embeds=torch.ones(1, 4))
        >>> uncond = Conditioning(torch.zeros(1, 77, 8), pooled_embeds=torch.zeros(1, 4))
        >>> both = Conditioning.cat([cond, uncond])
        >>> assert both.batch_size == 2 and both.pooled_embeds is not None and both.pooled_embeds.shape == (2, 4)
        >>> assert both.to(dtype=torch.float16).prompt_embeds.dtype == torch.float16
    """

    prompt_embeds: Float[Tensor, "batch seq dim"]
    pooled_embeds: Float[Tensor, "batch dim"] | None = None
    time_ids: Float[Tensor, "batch ids"] | None = None
    prompt_mask: Shaped[Tensor, "batch seq"] | None = None
    image_embeds: tuple[Float[Tensor, "batch tokens dim"], ...] | None = None
    control_residuals: tuple[Float[Tensor, "batch ..."], ...] | None = None
    text_ids: Float[Tensor, "seq 3"] | None = None
    image_ids: Float[Tensor, "image_seq 3"] | None = None
    embedded_guidance: Float[Tensor, "1"] | None = None

    BATCHED: ClassVar[tuple[str, ...]] = (
        "prompt_embeds",
        "pooled_embeds",
        "time_ids",
        "prompt_mask",
        "image_embeds",
        "control_residuals",
    )
    SHARED: ClassVar[tuple[str, ...]] = ("text_ids", "image_ids", "embedded_guidance")

    def __post_init__(self) -> None:
        _check_rank("prompt_embeds", self.prompt_embeds, 3, "(batch, seq, dim)")
        batch, seq = self.prompt_embeds.shape[:2]
        for name, axes in (("pooled_embeds", "(batch, dim)"), ("time_ids", "(batch, ids)"), ("prompt_mask", "(batch, seq)")):
            value = getattr(self, name)
            if value is not None:
                _check_rank(name, value, 2, axes)
                _check_batch(name, value, batch)
        if self.prompt_mask is not None and self.prompt_mask.shape[1] != seq:
            raise ValueError(f"Conditioning.prompt_mask covers {self.prompt_mask.shape[1]} tokens but prompt_embeds has {seq}")
        for name in ("image_embeds", "control_residuals"):
            parts: tuple[Tensor, ...] | None = getattr(self, name)
            for part in parts or ():
                if part.ndim < 2:
                    raise ValueError(_MSG_RANK.format(field=name, axes="tensors of (batch, ...)", shape=tuple(part.shape)))
                _check_batch(name, part, batch)
        for name in ("text_ids", "image_ids"):
            value = getattr(self, name)
            if value is not None and (value.ndim != 2 or value.shape[1] != 3):
                raise ValueError(_MSG_RANK.format(field=name, axes="(seq, 3)", shape=tuple(value.shape)))
        if self.text_ids is not None and self.text_ids.shape[0] != seq:
            raise ValueError(f"Conditioning.text_ids has {self.text_ids.shape[0]} positions but prompt_embeds has {seq} tokens")
        if self.embedded_guidance is not None and tuple(self.embedded_guidance.shape) != (1,):
            raise ValueError(_MSG_RANK.format(field="embedded_guidance", axes="(1,)", shape=tuple(self.embedded_guidance.shape)))

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    @classmethod
    def cat(cls, conditionings: Sequence[Conditioning]) -> Conditioning:
        """The conditionings concatenated along the batch, in order: one conditioning for one batched forward.

        Shared fields are taken from the first. Guidance concatenates once per call, not per step.

        Raises:
            ValueError: naming the field, when a field is set on some conditionings only, when a
                batched field differs in more than its batch, or when a shared field differs.
        """
        check_joinable(conditionings)
        if len(conditionings) == 1:
            return conditionings[0]
        joined: dict[str, object] = {}
        for name in cls.BATCHED:
            values = [getattr(c, name) for c in conditionings]
            if values[0] is None:
                continue
            if isinstance(values[0], tuple):
                joined[name] = tuple(torch.cat(parts) for parts in zip(*values, strict=True))
            else:
                joined[name] = torch.cat(values)
        return replace(conditionings[0], **joined)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """This conditioning on ``device``, with its floating-point tensors in ``dtype`` (masks keep theirs)."""
        moved: dict[str, object] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                moved[field.name] = tuple(_moved(part, device, dtype) for part in value)
            elif value is not None:
                moved[field.name] = _moved(value, device, dtype)
        return replace(self, **moved)


def check_joinable(conditionings: Sequence[Conditioning]) -> None:
    """Check that ``conditionings`` can be concatenated by :meth:`Conditioning.cat` (see there)."""
    if not conditionings:
        raise ValueError("Conditioning.cat needs at least one conditioning")
    total = len(conditionings)
    for name in Conditioning.BATCHED + Conditioning.SHARED:
        values = [getattr(c, name) for c in conditionings]
        given = sum(value is not None for value in values)
        if given not in (0, total):
            raise ValueError(_MSG_PRESENCE.format(field=name, count=given, total=total))
        if not given:
            continue
        if name in Conditioning.SHARED:
            if any(not _same(values[0], value) for value in values[1:]):
                raise ValueError(_MSG_SHARED.format(field=name))
            continue
        shapes = [_trailing(value) for value in values]
        for index, shape in enumerate(shapes[1:], start=1):
            if shape != shapes[0]:
                raise ValueError(_MSG_TRAILING.format(field=name, first=shapes[0], other=shape, index=index))


def _check_rank(name: str, value: Tensor, rank: int, axes: str) -> None:
    if value.ndim != rank:
        raise ValueError(_MSG_RANK.format(field=name, axes=axes, shape=tuple(value.shape)))


def _check_batch(name: str, value: Tensor, batch: int) -> None:
    if value.shape[0] != batch:
        raise ValueError(_MSG_BATCH.format(field=name, got=value.shape[0], batch=batch))


def _trailing(value: Tensor | tuple[Tensor, ...]) -> object:
    """The shape past the batch dim (one per part for tuples): what must agree for a concatenation."""
    if isinstance(value, tuple):
        return tuple(tuple(part.shape[1:]) for part in value)
    return tuple(value.shape[1:])


def _same(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b)))


def _moved(value: Tensor, device: torch.device | str | None, dtype: torch.dtype | None) -> Tensor:
    return value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else None)


__all__ = ["Conditioning", "check_joinable"]
