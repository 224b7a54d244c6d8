"""ControlNets around a UNet denoiser: residuals computed per pass from the latents and the control image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import final

import torch
from jaxtyping import Float
from torch import Tensor

from diffblocks.components.denoisers.base import AbstractDenoiser, Predict
from diffblocks.components.denoisers.conditioning import Conditioning
from diffblocks.components.denoisers.unet import UNetDenoiser
from diffblocks.components.models.controlnet import ControlNetModel, ControlNetUnionModel

_MSG_BATCH = (
    "the control image has batch {image} but the denoiser input has batch {batch}, which is not a multiple of it: "
    "prepare the control image for the run's batch (PrepareControlImage does)"
)


@final
@dataclass(frozen=True, slots=True, eq=False)
class Control:
    """One ControlNet with its control image and settings for one call.

    Args:
        model: the ControlNet.
        image: ``(batch, channels, height, width)`` control image in [0, 1], at the run's pixel size,
            with the run's batch (prompts times images per prompt), on the ControlNet's device and dtype.
        scale: ``controlnet_conditioning_scale``: its residuals are multiplied by it.
        start, end: ``control_guidance_start`` and ``control_guidance_end``, the fractions of the
            steps between which the ControlNet acts.
    """

    model: ControlNetModel
    image: Float[Tensor, "batch channels height width"]
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def active(self, step_index: int, num_steps: int) -> bool:
        """Whether it acts at ``step_index`` of ``num_steps``: diffusers' ``controlnet_keep``.

        A step acts when it lies wholly inside ``[start, end]`` as fractions of the run; outside,
        diffusers still runs the ControlNet at scale 0, which adds zeros, so it is skipped here.
        """
        return keeps(step_index, num_steps, self.start, self.end)

    def at(self, step_index: int, num_steps: int) -> Control | None:
        """This control at one step: itself when it acts (see :meth:`active`), else None."""
        return self if self.active(step_index, num_steps) else None

    def __call__(
        self, x: Tensor, t: Tensor, c: Conditioning, added: dict[str, Tensor] | None, *, guess_mode: bool = False
    ) -> tuple[Tensor, ...]:
        """Its residuals for one pass on ``x`` at ``t`` with the pass's conditioning (``added``: SDXL's)."""
        return self.model(
            _latents(x, self.model), t, c.prompt_embeds, _tiled(self.image, x.shape[0]), conditioning_scale=self.scale,
            added_cond_kwargs=added, encoder_attention_mask=c.prompt_mask, guess_mode=guess_mode,
        )  # fmt: skip


@final
@dataclass(frozen=True, slots=True, eq=False)
class UnionControl:
    """A ControlNet-Union with its control images, one per control mode, and their settings for one call.

    Args:
        model: the ControlNet-Union.
        images: one control image per mode, each as :class:`Control`'s ``image``.
        modes: the control type of each image.
        scales: ``controlnet_conditioning_scale`` per image.
        starts, ends: ``control_guidance_start`` and ``control_guidance_end`` per image.
        from_multi: the union is one net of several (diffusers' ``from_multi``): its residuals are
            scaled by the net's one scale, and it acts inside the net's one window; ``scales``,
            ``starts`` and ``ends`` then repeat the net's values for each image.
    """

    model: ControlNetUnionModel
    images: tuple[Float[Tensor, "batch channels height width"], ...]
    modes: tuple[int, ...]
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]
    from_multi: bool = False

    def at(self, step_index: int, num_steps: int) -> UnionControl | None:
        """This control at one step, each image's scale kept or zeroed by its window, as diffusers' union pipeline does.

        With one image, or as one net of several, a step outside its window is skipped (the
        residuals would be scaled to zero). With several images of a union acting alone, the union
        scales the images' features rather than its residuals, so diffusers runs it at every step
        and an image outside its window merely stops contributing.
        """
        if self.from_multi:
            return self if keeps(step_index, num_steps, self.starts[0], self.ends[0]) else None
        kept = tuple(
            scale * keeps(step_index, num_steps, start, end)
            for scale, start, end in zip(self.scales, self.starts, self.ends, strict=True)
        )
        if len(kept) == 1 and not keeps(step_index, num_steps, self.starts[0], self.ends[0]):
            return None
        return replace(self, scales=kept)

    def __call__(
        self, x: Tensor, t: Tensor, c: Conditioning, added: dict[str, Tensor] | None, *, guess_mode: bool = False
    ) -> tuple[Tensor, ...]:
        """Its residuals for one pass on ``x`` at ``t`` with the pass's conditioning (``added``: SDXL's)."""
        types = torch.zeros(self.model.params.num_control_type, device=x.device)
        types[list(self.modes)] = 1
        return self.model(
            _latents(x, self.model), t, c.prompt_embeds, [_tiled(image, x.shape[0]) for image in self.images],
            types.to(c.prompt_embeds.dtype).expand(x.shape[0], -1), self.modes, conditioning_scale=self.scales,
            added_cond_kwargs=added, guess_mode=guess_mode, from_multi=self.from_multi,
        )  # fmt: skip


AnyControl = Control | UnionControl
"""What a UNet ControlNet step runs: a ControlNet with its image, or a ControlNet-Union with its images and modes."""


def _latents(x: Tensor, model: ControlNetModel | ControlNetUnionModel) -> Tensor:
    """The latents of an inpainting UNet's input (mask and masked image's latents after them), which a ControlNet reads alone.

    diffusers' ``StableDiffusionControlNetInpaintPipeline`` runs the ControlNet on the latents before
    it puts the mask channels beside them; for any other UNet the input is the latents.
    """
    channels = model.params.in_channels
    return x if x.shape[1] == channels else x[:, :channels]


def keeps(step_index: int, num_steps: int, start: float, end: float) -> bool:
    """diffusers' ``controlnet_keep``: whether step ``step_index`` of ``num_steps`` lies wholly inside ``[start, end]``."""
    return not (step_index / num_steps < start or (step_index + 1) / num_steps > end)


@final
class ControlNetDenoiser(AbstractDenoiser):
    """A UNet denoiser whose passes first run ControlNets and hand their summed residuals to the UNet.

    Each pass ``predict(x, conditioning)`` runs every control on the same ``x``, timestep, prompt
    embeddings and (SDXL) added conditioning as the UNet, sums their residuals in order (as
    diffusers' ``MultiControlNetModel`` does) and passes them on as ``Conditioning.control_residuals``,
    added to any already there. The control image is tiled to the pass's batch: guidance
    concatenates its passes (``[cond, uncond]``) along the batch, and diffusers concatenates the
    control image the same way.

    Args:
        denoiser: the UNet's denoiser.
        controls: the controls at this step (see :meth:`Control.at`); none gives the plain UNet.
    """

    __slots__ = ("controls", "denoiser", "model", "prediction_type")

    def __init__(self, denoiser: UNetDenoiser, controls: Sequence[AnyControl]) -> None:
        self.denoiser = denoiser
        self.controls = tuple(controls)
        self.model = denoiser.model
        self.prediction_type = denoiser.prediction_type

    def __call__(self, x: Float[Tensor, "batch c h w"], t: Tensor, conditioning: Conditioning) -> Float[Tensor, "batch c h w"]:
        return self.at(t)(x, conditioning)

    def at(self, t: Tensor) -> Predict:
        predict = self.denoiser.at(t)
        return partial(self._predict, t, predict) if self.controls else predict

    def _predict(self, t: Tensor, predict: Predict, x: Tensor, c: Conditioning) -> Tensor:
        return predict(x, replace(c, control_residuals=control_residuals(self.controls, x, t, c)))


def control_residuals(
    controls: Sequence[AnyControl], x: Tensor, t: Tensor, c: Conditioning, *, guess_mode: bool = False
) -> tuple[Tensor, ...] | None:
    """The residuals of ``controls`` for one UNet pass, summed in order and added to any ``c`` already carries.

    Every control runs on the same ``x``, timestep, prompt embeddings and (SDXL) added conditioning
    as the UNet; ``guess_mode`` scales each net's residuals by diffusers' log-spaced rule
    (see :meth:`~diffblocks.components.models.controlnet.ControlNetModel.forward`).
    """
    residuals = c.control_residuals
    added = None
    if c.pooled_embeds is not None or c.time_ids is not None:
        added = {k: v for k, v in (("text_embeds", c.pooled_embeds), ("time_ids", c.time_ids)) if v is not None}
    for control in controls:
        out = control(x, t, c, added, guess_mode=guess_mode)
        residuals = out if residuals is None else tuple(a + b for a, b in zip(residuals, out, strict=True))
    return residuals


def _tiled(image: Tensor, batch: int) -> Tensor:
    """``image`` repeated along the batch to ``batch`` items (the passes of a batched guidance forward)."""
    if image.shape[0] == batch:
        return image
    if batch % image.shape[0]:
        raise ValueError(_MSG_BATCH.format(image=image.shape[0], batch=batch))
    return image.repeat(batch // image.shape[0], 1, 1, 1)


__all__ = ["AnyControl", "Control", "ControlNetDenoiser", "UnionControl", "control_residuals", "keeps"]
