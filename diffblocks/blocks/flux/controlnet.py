"""Flux ControlNet blocks: encode the control image once, add the residuals to the transformer at every step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, cast

import torch
from pydantic import Field
from torch import Tensor

from diffblocks.blocks.block import Block, BlockIO, component, known
from diffblocks.blocks.errors import FieldError
from diffblocks.blocks.fields import produced
from diffblocks.blocks.flux.latents import DEFAULT_LATENT_SIZE, check_flux_size, check_generators
from diffblocks.blocks.standard.controlnet import _MSG_BATCH, _MSG_WINDOW, Fraction, images_per_net, per_net
from diffblocks.blocks.standard.guidance import Guidance
from diffblocks.blocks.standard.images import ImageLike, check_image, normalize, to_tensor
from diffblocks.blocks.standard.latents import placement
from diffblocks.blocks.standard.vae import encode_latents, vae_scale_factor
from diffblocks.blocks.types import Float
from diffblocks.components.denoisers import FluxControl, FluxDenoiser, flux_control_residuals
from diffblocks.components.guiders import GuidanceConditions
from diffblocks.components.models.autoencoder_kl import AutoencoderKL
from diffblocks.components.models.controlnet import FluxControlNetModel, FluxMultiControlNetModel, flux_controlnets
from diffblocks.components.models.flux import FluxTransformer2DModel, pack_latents
from diffblocks.components.models.ip_adapter import FluxIPAdapterModel, MultiFluxIPAdapterModel
from diffblocks.components.noise import Generator

_MSG_FIT = (
    "the Flux ControlNet ({controlnet}) does not fit the transformer ({transformer}): {field} differs ({got} vs {expected}). "
    "A ControlNet steers the transformer it was trained beside: load one made for this base model"
)
_MSG_CHANNELS = "control_image has {got} channels, but Flux ControlNets read RGB images (3 channels) or gray ones (1)"
_MSG_MODES = "control_mode has {got} values but there are {nets} control images: give one mode per control image (or one for all)"


# What a Flux ControlNet must share with its transformer: the token and text widths, the positions, the guidance.
_FITTING = ("in_channels", "inner_dim", "joint_attention_dim", "pooled_projection_dim", "axes_dims_rope", "guidance_embeds")


def flux_family_name(params: object) -> str:
    """A short name of a Flux transformer or ControlNet, with its widths, for error messages."""
    heads, head_dim = getattr(params, "num_attention_heads", 0), getattr(params, "attention_head_dim", 0)
    return f"Flux, inner_dim={heads * head_dim}, joint_attention_dim={getattr(params, 'joint_attention_dim', None)}"


def flux_controlnet_mismatch(controlnet: FluxControlNetModel, transformer: FluxTransformer2DModel) -> str | None:
    """Why ``controlnet``'s residuals cannot be added to ``transformer`` (naming both), or None when it fits.

    The guidance embedding must agree too: the net reads the embedded guidance that the
    transformer's conditioning carries (dev's nets for dev, schnell's for schnell).
    """
    ours, theirs = controlnet.params.transformer(), transformer.params
    for field in _FITTING:
        got, expected = getattr(ours, field), getattr(theirs, field)
        if got != expected:
            return _MSG_FIT.format(controlnet=flux_family_name(ours), transformer=flux_family_name(theirs), field=field, got=got, expected=expected)
    return None


class PrepareFluxControlImage(Block):
    """The control images at the run's size and batch, as each Flux ControlNet reads them, with its settings.

    As diffusers' ``FluxControlNetPipeline`` prepares them: each image is resized to the run's
    ``height`` x ``width`` (Lanczos for PIL images; bilinear with antialiasing for arrays and
    tensors, which are read in [0, 1] like the other images), brought to [-1, 1] and given the
    run's batch; InstantX and Union nets read it VAE-encoded (a posterior sample drawn with the
    call's ``generator``, before the starting noise), normalised and packed into tokens, XLabs nets
    in pixels. A ControlNet-Union reads ``control_mode``, the kind of control image (its model
    card lists them).

    With several ControlNets (a :class:`FluxMultiControlNetModel`), ``control_image`` is a list with
    one entry per net, and each setting, ``control_mode`` included, is one value for all nets or a
    list with one per net.
    """

    class Inputs(BlockIO):
        control_image: ImageLike | list[ImageLike] = Field(
            description="the control image (edges, depth, pose, ...); a list of one per ControlNet for several"
        )
        control_mode: int | None | list[int | None] = Field(
            None, description="a ControlNet-Union's control mode (0..num_mode-1); a list of one per ControlNet for several"
        )
        controlnet_conditioning_scale: float | list[float] = Field(1.0, description="how strongly each ControlNet acts (0: not at all)")
        control_guidance_start: Fraction | list[Fraction] = Field(0.0, description="fraction of the steps where the control starts")
        control_guidance_end: Fraction | list[Fraction] = Field(1.0, description="fraction of the steps where the control ends")
        height: int | None = Field(None, description="image height in pixels, a multiple of 16 (default: 1024)")
        width: int | None = Field(None, description="image width in pixels, a multiple of 16 (default: 1024)")
        batch_size: int
        num_images_per_prompt: int = Field(1, ge=1, le=64)
        generator: Generator | None = None

    class Outputs(BlockIO):
        controls: tuple[FluxControl, ...]

    controlnet: FluxControlNetModel | FluxMultiControlNetModel = component(description="the Flux ControlNet, or several")
    vae: AutoencoderKL = component(description="encodes the control image for nets that read latents")
    transformer: FluxTransformer2DModel = component(description="the transformer the residuals are added to")

    def check_fit(self, components: Mapping[str, Any]) -> None:
        """A hand-built tree's Flux ControlNet is refused when it is built, as ``with_controlnet`` refuses it."""
        net, transformer = components.get("controlnet"), components.get("transformer")
        if not isinstance(net, (FluxControlNetModel, FluxMultiControlNetModel)) or not isinstance(transformer, FluxTransformer2DModel):
            return
        for each in flux_controlnets(net):
            problem = flux_controlnet_mismatch(each, transformer)
            if problem is not None:
                raise FieldError("controlnet", problem)

    def check(self, inputs: Inputs) -> None:
        nets = flux_controlnets(self.controlnet)
        for net in nets:
            problem = flux_controlnet_mismatch(net, self.transformer)
            if problem is not None:
                raise FieldError("controlnet", problem)
        n = len(nets)
        starts = per_net(known(inputs, "control_guidance_start"), n, "control_guidance_start")
        ends = per_net(known(inputs, "control_guidance_end"), n, "control_guidance_end")
        per_net(known(inputs, "controlnet_conditioning_scale"), n, "controlnet_conditioning_scale")
        for start, end in zip(starts, ends, strict=True):
            if isinstance(start, float) and isinstance(end, float) and start > end:
                raise FieldError("control_guidance_start", _MSG_WINDOW.format(start=start, end=end))
        modes = known(inputs, "control_mode")
        if isinstance(modes, list) and len(modes) != n:
            raise FieldError("control_mode", _MSG_MODES.format(got=len(modes), nets=n))
        for net, mode in zip(nets, modes if isinstance(modes, list) else [modes] * n, strict=True):
            try:
                net.check_mode(mode)
            except ValueError as err:
                raise FieldError("control_mode", str(err)) from err
        given = known(inputs, "control_image")
        for image in images_per_net(given, n) if given is not None else ():
            check_image(cast(ImageLike, image), name="control_image")  # a Flux net's entry is one image or a batch
        check_flux_size(self.vae, height=known(inputs, "height"), width=known(inputs, "width"))
        check_generators(inputs, placement(self.transformer)[0])

    def __call__(self, inputs: Inputs) -> Outputs:
        nets = flux_controlnets(self.controlnet)
        n = len(nets)
        default = DEFAULT_LATENT_SIZE * vae_scale_factor(self.vae)
        height, width = inputs.height or default, inputs.width or default
        images = images_per_net(inputs.control_image, n)
        modes = per_net(inputs.control_mode, n, "control_mode")
        scales = per_net(inputs.controlnet_conditioning_scale, n, "controlnet_conditioning_scale")
        starts = per_net(inputs.control_guidance_start, n, "control_guidance_start")
        ends = per_net(inputs.control_guidance_end, n, "control_guidance_end")
        controls = []
        for net, image, mode, scale, start, end in zip(nets, images, modes, scales, starts, ends, strict=True):
            device, dtype = placement(net)
            pixels = self.batched(normalize(self.image(cast(ImageLike, image), height=height, width=width)), inputs)
            read = self.encoded(pixels, inputs.generator) if net.reads_latents else pixels
            mode_ids = None if mode is None else torch.full((read.shape[0], 1), mode, dtype=torch.long, device=device)
            controls.append(FluxControl(net, read.to(device=device, dtype=dtype), mode_ids, scale=scale, start=start, end=end))
        return self.Outputs(controls=tuple(controls))

    def image(self, image: ImageLike, *, height: int, width: int) -> Tensor:
        """A control image as a ``(batch, 3, height, width)`` tensor in [0, 1]; override to preprocess otherwise.

        A one-channel image (a depth map) is gray: its channel is repeated to RGB, which the VAE encodes.
        """
        tensor = to_tensor(image, height=height, width=width)
        if tensor.shape[1] == 1:
            return tensor.expand(-1, 3, -1, -1)
        if tensor.shape[1] != 3:
            raise FieldError("control_image", _MSG_CHANNELS.format(got=tensor.shape[1]))
        return tensor

    def batched(self, image: Tensor, inputs: Inputs) -> Tensor:
        """``image`` with the run's batch: one image for all prompts, or one per prompt repeated per image of it."""
        batch, per_prompt = inputs.batch_size, inputs.num_images_per_prompt
        if image.shape[0] == 1:
            return image.repeat(batch, 1, 1, 1)
        if image.shape[0] == batch // per_prompt:
            return image.repeat_interleave(per_prompt, dim=0)
        raise FieldError("control_image", _MSG_BATCH.format(got=image.shape[0], prompts=batch // per_prompt, batch=batch))

    def encoded(self, pixels: Tensor, generator: Generator | None) -> Tensor:
        """Pixels in [-1, 1] to the packed, normalised latents an InstantX or Union net reads."""
        device, dtype = placement(self.transformer)
        return pack_latents(encode_latents(self.vae, pixels.to(device=device, dtype=dtype), generator).to(dtype))


class PredictControlledFlow(Block):
    """:class:`~diffblocks.blocks.flux.PredictFlow` with Flux ControlNets: their residuals join every guidance pass.

    As in diffusers' ``FluxControlNetPipeline``, the nets that act at this step run once, on the
    prompt's conditioning (not the negative prompt's), and their residuals serve every pass of
    the guider; :class:`~diffblocks.components.denoisers.FluxDenoiser` hands them to the
    transformer through ``Conditioning.control_residuals``.
    """

    class Inputs(BlockIO):
        latents: Float["batch seq channels"]
        t: Tensor
        guidance: Guidance = produced(description="the guider and its passes for this run")
        controls: tuple[FluxControl, ...] = produced(description="the Flux ControlNets and their control images")
        step_index: int
        num_steps: int

    class Outputs(BlockIO):
        noise_pred: Float["batch seq channels"]

    transformer: FluxTransformer2DModel = component(description="the denoiser")
    ip_adapter: FluxIPAdapterModel | MultiFluxIPAdapterModel = component(
        optional=True, description="reads the image prompt's tokens in the conditioning (docs/ip_adapter.md)"
    )

    def __call__(self, inputs: Inputs) -> Outputs:
        denoiser = FluxDenoiser(self.transformer, ip_adapter=self.ip_adapter)
        t = inputs.t.to(inputs.latents.dtype)
        guidance = self.controlled(inputs.guidance, inputs.controls, inputs.latents, t, inputs.step_index, inputs.num_steps)
        noise_pred = guidance.prediction(
            denoiser.at(t), latents=inputs.latents, step_index=inputs.step_index, num_steps=inputs.num_steps, model=denoiser.model
        )
        return self.Outputs(noise_pred=noise_pred)

    def controlled(
        self, guidance: Guidance, controls: tuple[FluxControl, ...], latents: Tensor, t: Tensor, step_index: int, num_steps: int
    ) -> Guidance:
        """``guidance`` whose conditions carry this step's residuals (unchanged when no net acts at this step)."""
        active = [c for c in controls if c.active(step_index, num_steps)]
        conditions = guidance.conditions
        residuals = flux_control_residuals(active, latents, t, conditions["cond"], transformer=self.transformer)
        if residuals is None:
            return guidance
        with_residuals = {name: replace(c, control_residuals=residuals) for name, c in conditions.items()}
        return replace(guidance, conditions=GuidanceConditions(with_residuals))


__all__ = ["PredictControlledFlow", "PrepareFluxControlImage", "flux_controlnet_mismatch", "flux_family_name"]
