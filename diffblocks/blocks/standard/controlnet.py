"""ControlNet blocks for the UNet families: prepare the control image once, add the residuals at every step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Annotated, Any, TypeVar, cast

import torch

from pydantic import Field
from torch import Tensor

from diffblocks.blocks.block import Block, BlockIO, component, known
from diffblocks.blocks.errors import FieldError
from diffblocks.blocks.fields import produced
from diffblocks.blocks.standard.control_modes import Mode, modes_per_net
from diffblocks.blocks.standard.denoise import prediction_type
from diffblocks.blocks.standard.guidance import Guidance
from diffblocks.blocks.standard.images import ImageLike, check_image, to_tensor
from diffblocks.blocks.standard.latents import placement
from diffblocks.blocks.types import Float
from diffblocks.components.denoisers import AnyControl, Control, ControlNetDenoiser, UNetDenoiser, UnionControl, control_residuals
from diffblocks.components.guiders import GuidanceConditions
from diffblocks.components.models.controlnet import (
    ControlNetModel,
    ControlNetUnionModel,
    MultiControlNetModel,
    MultiControlNetUnionModel,
    controlnets,
)
from diffblocks.components.models.ip_adapter import IPAdapterModel, MultiIPAdapterModel
from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.components.schedulers.base import AbstractScheduler

_MSG_WINDOW = (
    "control_guidance_start {start} is after control_guidance_end {end}: the ControlNet would act at no step; "
    "give start <= end (fractions of the steps, e.g. 0.0 and 0.6)"
)
_MSG_BATCH = (
    "control_image has {got} images but the run has {prompts} prompt(s) ({batch} images in all): "
    "give one control image for every prompt, or one for all of them"
)
_MSG_FIT = (
    "the ControlNet ({controlnet}) does not fit the UNet ({unet}): {field} differs ({got} vs {expected}). "
    "A ControlNet steers the UNet it was trained beside: load one made for this base model"
)

_MSG_COUNT = (
    "{field} has {got} values but there are {nets} ControlNets: give one value for all of them, or one per ControlNet"
)
_MSG_IMAGES = (
    "control_image must be a list of {nets} control images, one per ControlNet (a union's: one per control_mode; "
    "each an image or a batch), got {got}"
)

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
T = TypeVar("T")

# What a ControlNet must share with its UNet for its residuals to be added: the encoder's shape and the conditioning.
_FITTING = ("block_out_channels", "layers_per_block", "in_channels", "cross_attention_dim", "addition_embed_type",
            "projection_class_embeddings_input_dim")  # fmt: skip


def family_name(params: object) -> str:
    """A short name of the family a UNet or ControlNet belongs to, with its widths, for error messages."""
    family = "SDXL" if getattr(params, "addition_embed_type", None) == "text_time" else "SD 1.x/2.x"
    widths = getattr(params, "block_out_channels", ())
    return f"{family}, block_out_channels={tuple(widths)}, cross_attention_dim={getattr(params, 'cross_attention_dim', None)}"


def controlnet_mismatch(controlnet: ControlNetModel | ControlNetUnionModel, unet: UNet2DConditionModel) -> str | None:
    """Why ``controlnet``'s residuals cannot be added to ``unet`` (naming both), or None when it fits."""
    ours, theirs = controlnet.params, unet.params
    for field in _FITTING:
        got, expected = getattr(ours, field), getattr(theirs, field)
        if field == "layers_per_block":
            expected = theirs.layers
            got = (got,) * len(expected)
        if field == "in_channels" and expected == 2 * got + 1:
            continue  # an inpainting UNet: the latents, the mask and the masked image's latents; the ControlNet reads the latents
        if field == "cross_attention_dim":
            expected = theirs.cross_dims[0] if len(set(theirs.cross_dims)) == 1 else theirs.cross_dims
        if got != expected:
            return _MSG_FIT.format(controlnet=family_name(ours), unet=family_name(theirs), field=field, got=got, expected=expected)
    return None


class PrepareControlImage(Block):
    """The control images at the run's size and batch, in [0, 1], and each ControlNet's settings for the call.

    Each image is resized to the run's ``height`` x ``width`` when its size differs (Lanczos for PIL
    images, as diffusers resizes them; bilinear with antialiasing for arrays and tensors) and is
    not normalised: ControlNets read it in [0, 1]. One control image serves every prompt; else
    there is one per prompt, repeated for each of its ``num_images_per_prompt`` images.

    With several ControlNets (a :class:`MultiControlNetModel`, or a :class:`MultiControlNetUnionModel`
    holding unions and perhaps plain nets), ``control_image`` is a list with one entry per net, and
    each setting is one value for all nets or a list with one per net; ``control_mode`` then has
    one entry per net (a union's type, or list of types with a list of as many images as its
    entry of ``control_image``; None for a plain net).
    """

    class Inputs(BlockIO):
        control_image: ImageLike | list[ImageLike | list[ImageLike]] = Field(
            description="the control image (edges, depth, pose, ...); a list of one per ControlNet for several"
        )
        controlnet_conditioning_scale: float | list[float] = Field(
            1.0, description="how strongly each ControlNet acts (0: not at all)"
        )
        control_guidance_start: Fraction | list[Fraction] = Field(0.0, description="fraction of the steps where the control starts")
        control_guidance_end: Fraction | list[Fraction] = Field(1.0, description="fraction of the steps where the control ends")
        latents: Float["batch channels height width"] = produced(description="the starting latents (gives the run's batch)")
        height: int
        width: int
        num_images_per_prompt: int = Field(1, ge=1, le=64)
        control_mode: int | list[Mode | None] | None = Field(
            None,
            description="a ControlNet-Union's control type of each control image (0..num_control_type-1); one entry per net for several",
        )

    class Outputs(BlockIO):
        controls: tuple[AnyControl, ...]

    controlnet: ControlNetModel | MultiControlNetModel | ControlNetUnionModel | MultiControlNetUnionModel = component(
        description="the ControlNet, several, or a ControlNet-Union (alone or beside other nets)"
    )
    unet: UNet2DConditionModel = component(description="the UNet its residuals are added to")

    def check_fit(self, components: Mapping[str, Any]) -> None:
        """A hand-built tree's ControlNet is refused when it is built, as ``with_controlnet`` refuses it."""
        net, unet = components.get("controlnet"), components.get("unet")
        if not isinstance(unet, UNet2DConditionModel) or net is None:
            return
        if not isinstance(net, (ControlNetModel, ControlNetUnionModel, MultiControlNetModel, MultiControlNetUnionModel)):
            return
        for each in controlnets(net):
            problem = controlnet_mismatch(each, unet)
            if problem is not None:
                raise FieldError("controlnet", problem)

    def check(self, inputs: Inputs) -> None:
        nets = self.nets()
        for net in nets:
            problem = controlnet_mismatch(net, self.unet)
            if problem is not None:
                raise FieldError("controlnet", problem)
        modes = modes_per_net(nets, known(inputs, "control_mode"))  # refused for a net that is not a union
        n = len(modes[0] or ()) if self.union is not None else len(nets)
        starts = per_net(known(inputs, "control_guidance_start"), n, "control_guidance_start")
        ends = per_net(known(inputs, "control_guidance_end"), n, "control_guidance_end")
        per_net(known(inputs, "controlnet_conditioning_scale"), n, "controlnet_conditioning_scale")
        for start, end in zip(starts, ends, strict=True):
            if isinstance(start, float) and isinstance(end, float) and start > end:
                raise FieldError("control_guidance_start", _MSG_WINDOW.format(start=start, end=end))
        given = known(inputs, "control_image")
        if given is None:
            return
        for image, net_modes in zip(images_per_net(given, n), modes if self.union is None else [None] * n, strict=True):
            for each in images_per_net(image, len(net_modes)) if net_modes is not None else [image]:
                check_image(cast(ImageLike, each), name="control_image")

    def __call__(self, inputs: Inputs) -> Outputs:
        union, nets = self.union, self.nets()
        modes = modes_per_net(nets, inputs.control_mode)
        n = len(modes[0] or ()) if union is not None else len(nets)
        images = images_per_net(inputs.control_image, n)
        scales = per_net(inputs.controlnet_conditioning_scale, n, "controlnet_conditioning_scale")
        starts = per_net(inputs.control_guidance_start, n, "control_guidance_start")
        ends = per_net(inputs.control_guidance_end, n, "control_guidance_end")
        if union is not None:
            prepared = tuple(self.prepared(union, image, inputs) for image in images)
            return self.Outputs(controls=(UnionControl(union, prepared, modes[0] or (), tuple(scales), tuple(starts), tuple(ends)),))
        controls: list[AnyControl] = []
        for net, image, net_modes, scale, start, end in zip(nets, images, modes, scales, starts, ends, strict=True):
            if isinstance(net, ControlNetModel):
                controls.append(Control(net, self.prepared(net, image, inputs), scale=scale, start=start, end=end))
                continue
            assert net_modes is not None  # modes_per_net gives each union its modes
            k = len(net_modes)  # one net of several: the union's residuals take the net's one scale and window
            prepared = tuple(self.prepared(net, each, inputs) for each in images_per_net(image, k))
            controls.append(UnionControl(net, prepared, net_modes, (scale,) * k, (start,) * k, (end,) * k, from_multi=True))
        return self.Outputs(controls=tuple(controls))

    def prepared(self, net: ControlNetModel | ControlNetUnionModel, image: ImageLike | list[ImageLike], inputs: Inputs) -> Tensor:
        """One control image at the run's size and batch, on ``net``'s device and dtype."""
        device, dtype = placement(net)
        batched = self.batched(self.image(cast(ImageLike, image), height=inputs.height, width=inputs.width), inputs)
        return batched.to(device=device, dtype=dtype)

    @property
    def union(self) -> ControlNetUnionModel | None:
        """The ControlNet-Union, when that is the component."""
        return self.controlnet if isinstance(self.controlnet, ControlNetUnionModel) else None

    def nets(self) -> tuple[ControlNetModel | ControlNetUnionModel, ...]:
        """The component's nets, in order."""
        return controlnets(self.controlnet)

    def image(self, image: ImageLike, *, height: int, width: int) -> Tensor:
        """A control image as a ``(batch, channels, height, width)`` tensor in [0, 1]; override to preprocess otherwise."""
        return to_tensor(image, height=height, width=width)

    def batched(self, image: Tensor, inputs: Inputs) -> Tensor:
        """``image`` with the run's batch: one image for all prompts, or one per prompt repeated per image of it."""
        batch = inputs.latents.shape[0]
        prompts = batch // inputs.num_images_per_prompt
        if image.shape[0] == 1:
            return image.repeat(batch, 1, 1, 1)
        if image.shape[0] == prompts:
            return image.repeat_interleave(inputs.num_images_per_prompt, dim=0)
        raise FieldError("control_image", _MSG_BATCH.format(got=image.shape[0], prompts=prompts, batch=batch))


def images_per_net(value: ImageLike | list[ImageLike | list[ImageLike]], nets: int) -> list[ImageLike | list[ImageLike]]:
    """The control image of each net (or a union's mode): the value itself for one (a list is a batch), its entries for several."""
    if nets == 1:
        return [value]
    if not isinstance(value, list) or len(value) != nets:
        got = f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
        raise FieldError("control_image", _MSG_IMAGES.format(nets=nets, got=got))
    return value


def per_net(value: T | list[T], nets: int, field: str) -> list[T]:
    """One value per net: a single value repeated, or a list whose length is the number of nets."""
    if not isinstance(value, list):
        return [value] * nets
    if len(value) != nets:
        raise FieldError(field, _MSG_COUNT.format(field=field, got=len(value), nets=nets))
    return value


class PredictControlledNoise(Block):
    """:class:`~diffblocks.blocks.standard.PredictNoise` with ControlNets: their residuals join every guidance pass.

    The denoiser is a :class:`~diffblocks.components.denoisers.ControlNetDenoiser` around the UNet's,
    holding the controls that act at this step (``control_guidance_start/end``).

    In guess mode (``guess_mode=True``, diffusers' option of that name) the ControlNets run once
    per step, on the prompt's conditioning only, with log-spaced scales (0.1 at the shallowest
    residual up to 1 at the mid block); the prompt's passes get their residuals and the negative
    prompt's passes none, so the control image alone must convey the content.
    """

    class Inputs(BlockIO):
        model_input: Float["batch channels height width"] = produced(description="the latents scaled for the model")
        t: Tensor
        guidance: Guidance = produced(description="the guider and its passes for this run")
        controls: tuple[AnyControl, ...] = produced(description="the ControlNets and their control images")
        step_index: int
        num_steps: int
        guess_mode: bool = Field(False, description="the ControlNets read the prompt's pass only, with log-spaced scales")

    class Outputs(BlockIO):
        noise_pred: Float["batch channels height width"]

    unet: UNet2DConditionModel = component(description="the denoiser")
    scheduler: AbstractScheduler = component(optional=True, description="its prediction_type is what the UNet predicts")
    ip_adapter: IPAdapterModel | MultiIPAdapterModel = component(
        optional=True, description="reads the image prompt's tokens in the conditioning (docs/ip_adapter.md)"
    )

    def __call__(self, inputs: Inputs) -> Outputs:
        guidance = inputs.guidance
        if inputs.guess_mode:
            active = at_step(inputs.controls, inputs.step_index, inputs.num_steps)
            guidance = guessed(guidance, active, inputs.model_input, inputs.t)
            denoiser = self.denoiser((), inputs.step_index, inputs.num_steps)
        else:
            denoiser = self.denoiser(inputs.controls, inputs.step_index, inputs.num_steps)
        noise_pred = guidance.prediction(
            denoiser.at(inputs.t),
            latents=inputs.model_input,
            step_index=inputs.step_index,
            num_steps=inputs.num_steps,
            model=denoiser.model,
        )
        return self.Outputs(noise_pred=noise_pred)

    def denoiser(self, controls: tuple[AnyControl, ...], step_index: int, num_steps: int) -> ControlNetDenoiser:
        """The UNet with the controls that act at this step."""
        unet = UNetDenoiser(self.unet, prediction_type=prediction_type(self.scheduler), ip_adapter=self.ip_adapter)
        return ControlNetDenoiser(unet, at_step(controls, step_index, num_steps))


def at_step(controls: tuple[AnyControl, ...], step_index: int, num_steps: int) -> list[AnyControl]:
    """The controls that act at this step, with this step's scales (see ``Control.at``)."""
    return [c for c in (control.at(step_index, num_steps) for control in controls) if c is not None]


def guessed(guidance: Guidance, controls: list[AnyControl], x: Tensor, t: Tensor) -> Guidance:
    """``guidance`` whose prompt conditioning carries guess-mode residuals and whose other conditions zeros.

    diffusers' guess mode: the ControlNets run on the prompt's half of the batch only and the
    unconditional half gets zero residuals. Unchanged when no net acts at this step.
    """
    conditions = guidance.conditions
    residuals = control_residuals(controls, x, t, conditions["cond"], guess_mode=True) if controls else None
    if residuals is None:
        return guidance
    zeros = tuple(torch.zeros_like(r) for r in residuals)
    guessing = {name: replace(c, control_residuals=residuals if name == "cond" else zeros) for name, c in conditions.items()}
    return replace(guidance, conditions=GuidanceConditions(guessing))


__all__ = ["Fraction", "PredictControlledNoise", "PrepareControlImage", "controlnet_mismatch", "at_step", "family_name", "guessed", "images_per_net", "per_net"]
