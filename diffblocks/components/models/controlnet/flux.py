"""Flux ControlNet and ControlNet-Union (diffusers ``FluxControlNetModel`` compatible).

A Flux ControlNet is a shallow copy of the Flux transformer (a few double and single blocks) that
reads the noisy tokens plus the control image's packed VAE latents (InstantX) or a pixel-space
hint embedding (XLabs); a zero-initialised linear layer after each of its blocks gives one
residual per block. The transformer adds them to its own blocks' image tokens by an interval rule
(:func:`flux_block_residuals`). A union net (``num_mode``) also reads a control mode (canny,
depth, pose, ...) as one extra text token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, final

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from pydantic import model_validator
from torch import Tensor, nn
from typing_extensions import Self

from diffblocks.components.models.base import AbstractModel, AbstractParams
from diffblocks.components.models.controlnet.model import ControlNetConditioningEmbedding
from diffblocks.components.models.controlnet.multi import AbstractMultiControlNet
from diffblocks.components.models.flux.blocks import FluxSingleTransformerBlock, FluxTransformerBlock
from diffblocks.components.models.flux.embeddings import RotaryEmbedding, TimeTextEmbedding
from diffblocks.components.models.flux.params import FluxParams

HINT_WIDTHS = (16, 16, 16, 16)
"""Widths of the XLabs hint embedding (diffusers builds it with these, whatever the config says)."""

_MSG_MODE = (
    "this ControlNet-Union knows {modes} control modes (0..{last}), got control_mode {got}: "
    "pick the mode its model card gives for the control image (canny, depth, pose, ...)"
)
_MSG_NO_MODE = "this is a ControlNet-Union (num_mode={modes}): pass {field}, the control image's kind (0..{last})"


@final
class FluxControlNetParams(AbstractParams):
    """FluxControlNetModel architecture, under diffusers' config keys.

    The transformer fields mean what they mean in :class:`~diffblocks.components.models.flux.FluxParams`
    (:meth:`transformer` gives them as such, so the same checks apply); ``num_layers`` and
    ``num_single_layers`` are the ControlNet's own depths, usually far fewer than its transformer's.

    Args:
        num_mode: a ControlNet-Union's number of control modes; None for a single-purpose net.
        conditioning_embedding_channels: set for XLabs nets, which read the control image in pixel
            space through a small convolutional hint embedding; None (InstantX) reads its packed
            VAE latents.
    """

    patch_size: int = 1
    in_channels: int = 64
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    num_mode: int | None = None
    conditioning_embedding_channels: int | None = None

    def transformer(self) -> FluxParams:
        """The transformer shape this ControlNet copies (its blocks, embeddings and positions)."""
        return FluxParams(**self.model_dump(exclude={"num_mode", "conditioning_embedding_channels"}))

    @model_validator(mode="after")
    def _check(self) -> Self:
        self.transformer()  # the transformer's own checks: heads, rope axes, widths
        if self.num_mode is not None and self.num_mode < 1:
            raise ValueError(f"num_mode must be >= 1 (the number of control modes), got {self.num_mode}")
        if self.conditioning_embedding_channels is not None and self.conditioning_embedding_channels < 1:
            raise ValueError(f"conditioning_embedding_channels must be >= 1, got {self.conditioning_embedding_channels}")
        return self


@final
@dataclass(frozen=True, slots=True)
class FluxControlNetOutput:
    """A Flux ControlNet's residuals: one per double block and one per single block of the ControlNet."""

    block_samples: tuple[Float[Tensor, "batch img_seq dim"], ...]
    single_block_samples: tuple[Float[Tensor, "batch img_seq dim"], ...]


@final
class FluxControlNetModel(AbstractModel[FluxControlNetParams]):
    """The residuals a control image adds to the Flux transformer's blocks (InstantX, XLabs and Union nets).

    It embeds the noisy tokens, adds the embedded control (``controlnet_x_embedder`` of the packed
    control latents, or of the XLabs hint embedding), runs the transformer's own double and single
    blocks, and turns each block's image tokens into a residual with a zero-initialised linear layer.
    A union net prepends its control mode's embedding to the text tokens (with a text position).
    Module and parameter names equal diffusers' ``FluxControlNetModel``, so its folders load unchanged.

    Args:
        params: the architecture; build from a diffusers config with :meth:`from_config`.

    Example:
        >>> from diffblocks.components.models.flux import prepare_image_ids, prepare_text_ids
        >>> net = FluxControlNetModel(FluxControlNetParams(in_channels=16, num_layers=2, num_single_layers=1,
        ...     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
        ...     axes_dims_rope=(2, 2, 4), num_mode=3))
        >>> out = net(torch.randn(1, 6, 16), torch.randn(1, 6, 16), controlnet_mode=torch.tensor([[2]]),
        ...     encoder_hidden_states=torch.randn(1, 5, 16), pooled_projections=torch.randn(1, 8),
        ...     timestep=torch.tensor([0.7]), img_ids=prepare_image_ids(2, 3), txt_ids=prepare_text_ids(5))
        >>> len(out.block_samples), len(out.single_block_samples), tuple(out.block_samples[0].shape)
        (2, 1, (1, 6, 16))
    """

    Params = FluxControlNetParams
    diffusers_class_name = "FluxControlNetModel"
    repeated_blocks: ClassVar[tuple[type[nn.Module], ...]] = (FluxTransformerBlock, FluxSingleTransformerBlock)

    def __init__(self, params: FluxControlNetParams) -> None:
        super().__init__(params)
        p = params.transformer()
        dim, heads, head_dim = p.inner_dim, p.num_attention_heads, p.attention_head_dim
        self.pos_embed = RotaryEmbedding(p.axes_dims_rope)
        self.time_text_embed = TimeTextEmbedding(dim, pooled_projection_dim=p.pooled_projection_dim, guidance_embeds=p.guidance_embeds)
        self.context_embedder = nn.Linear(p.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(p.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(dim, num_attention_heads=heads, attention_head_dim=head_dim) for _ in range(p.num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(dim, num_attention_heads=heads, attention_head_dim=head_dim)
            for _ in range(p.num_single_layers)
        )
        self.controlnet_blocks = nn.ModuleList(_zero_linear(nn.Linear(dim, dim)) for _ in range(p.num_layers))
        self.controlnet_single_blocks = nn.ModuleList(_zero_linear(nn.Linear(dim, dim)) for _ in range(p.num_single_layers))
        self.controlnet_mode_embedder: nn.Embedding | None = None
        if params.num_mode is not None:
            self.controlnet_mode_embedder = nn.Embedding(params.num_mode, dim)
        self.input_hint_block: ControlNetConditioningEmbedding | None = None
        if params.conditioning_embedding_channels is not None:
            self.input_hint_block = ControlNetConditioningEmbedding(3, HINT_WIDTHS, params.conditioning_embedding_channels)
            self.controlnet_x_embedder = nn.Linear(p.in_channels, dim)
        else:
            self.controlnet_x_embedder = _zero_linear(nn.Linear(p.in_channels, dim))

    @property
    def reads_latents(self) -> bool:
        """Whether the control image is given as packed VAE latents (InstantX, Union) rather than pixels (XLabs)."""
        return self.input_hint_block is None

    @property
    def repeats_blocks(self) -> bool:
        """Whether the transformer cycles through the residuals (XLabs) rather than spreading them (diffusers' rule)."""
        return self.input_hint_block is not None

    def forward(
        self,
        hidden_states: Float[Tensor, "batch img_seq in_channels"],
        controlnet_cond: Float[Tensor, "batch img_seq in_channels"] | Float[Tensor, "batch 3 height width"],
        *,
        encoder_hidden_states: Float[Tensor, "batch txt_seq joint_attention_dim"],
        pooled_projections: Float[Tensor, "batch pooled_projection_dim"],
        timestep: Float[Tensor, " batch"],
        img_ids: Float[Tensor, "img_seq 3"],
        txt_ids: Float[Tensor, "txt_seq 3"],
        guidance: Float[Tensor, " batch"] | None = None,
        controlnet_mode: Int[Tensor, "batch 1"] | None = None,
        conditioning_scale: float = 1.0,
    ) -> FluxControlNetOutput:
        """The residuals for one transformer call, each times ``conditioning_scale``.

        Args:
            hidden_states: packed noisy latents, as the transformer gets them.
            controlnet_cond: the packed control latents (normalised like the latents), or for an
                XLabs net the control image in [-1, 1] at the run's pixel size.
            encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance: as for
                :class:`~diffblocks.components.models.flux.FluxTransformer2DModel`.
            controlnet_mode: a union net's control mode per batch item; None for other nets.
            conditioning_scale: how strongly the control acts (0: not at all).
        """
        hidden_states = self.x_embedder(hidden_states)
        if self.input_hint_block is not None:
            hint = self.input_hint_block(controlnet_cond)  # (b, c, h/8, w/8): one token per patch, (c, dy, dx) channels
            size = self.params.patch_size
            controlnet_cond = rearrange(hint, "b c (h dy) (w dx) -> b (h w) (c dy dx)", dy=size, dx=size)
        hidden_states = hidden_states + self.controlnet_x_embedder(controlnet_cond)

        timestep = timestep.to(hidden_states.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(hidden_states.dtype) * 1000
        temb = F.silu(self.time_text_embed(timestep, pooled_projections, guidance=guidance))
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        if self.controlnet_mode_embedder is not None:
            modes = self.controlnet_mode_embedder.num_embeddings
            if controlnet_mode is None:
                raise ValueError(_MSG_NO_MODE.format(modes=modes, last=modes - 1, field="controlnet_mode"))
            encoder_hidden_states = torch.cat([self.controlnet_mode_embedder(controlnet_mode), encoder_hidden_states], dim=1)
            txt_ids = torch.cat([txt_ids[:1], txt_ids], dim=0)  # the mode token sits at a text position
        rope = self.pos_embed(torch.cat([txt_ids, img_ids], dim=0))

        samples: list[Tensor] = []
        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb=temb, rope=rope)
            samples.append(hidden_states)
        single: list[Tensor] = []
        for block in self.single_transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb=temb, rope=rope)
            single.append(hidden_states)
        return FluxControlNetOutput(
            tuple(proj(s) * conditioning_scale for proj, s in zip(self.controlnet_blocks, samples, strict=True)),
            tuple(proj(s) * conditioning_scale for proj, s in zip(self.controlnet_single_blocks, single, strict=True)),
        )

    def check_mode(self, mode: int | None) -> None:
        """Refuse a control mode this net does not know (a union net needs one in ``0..num_mode-1``)."""
        modes = self.params.num_mode
        if modes is None:
            if mode is not None:
                raise ValueError(
                    f"control_mode {mode} is given, but this Flux ControlNet is not a ControlNet-Union (num_mode is None): "
                    "leave control_mode out"
                )
            return
        if mode is None:
            raise ValueError(_MSG_NO_MODE.format(modes=modes, last=modes - 1, field="control_mode"))
        if not 0 <= mode < modes:
            raise ValueError(_MSG_MODE.format(modes=modes, last=modes - 1, got=mode))


def flux_block_residuals(
    output: FluxControlNetOutput, *, num_layers: int, num_single_layers: int, repeat: bool = False
) -> tuple[Tensor, ...]:
    """A ControlNet's residuals spread over a transformer's blocks: one per double block, then one per single block.

    diffusers' rule (``FluxTransformer2DModel.forward``): with ``n`` residuals for ``N`` blocks,
    block ``i`` gets residual ``i // ceil(N / n)``, so each residual serves a run of neighbouring
    blocks; XLabs nets (``repeat``) cycle instead, block ``i`` getting residual ``i % n``. A net
    without single blocks gives residuals for the double blocks only. The same tensors are
    repeated, not copied.
    """
    out = list(_spread(output.block_samples, num_layers, repeat=repeat))
    if output.single_block_samples:
        out += _spread(output.single_block_samples, num_single_layers, repeat=False)
    return tuple(out)


def _spread(samples: Sequence[Tensor], blocks: int, *, repeat: bool) -> list[Tensor]:
    if not samples:
        raise ValueError(f"a Flux ControlNet without double blocks has no residuals for the transformer's {blocks} double blocks")
    if repeat:
        return [samples[i % len(samples)] for i in range(blocks)]
    interval = math.ceil(blocks / len(samples))
    return [samples[i // interval] for i in range(blocks)]


def sum_residuals(a: tuple[Tensor, ...] | None, b: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Per-block residuals of two nets added (a net without single blocks adds nothing to them)."""
    if a is None:
        return b
    longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
    return tuple(x + y for x, y in zip(a, b, strict=False)) + longer[len(shorter) :]


@final
class FluxMultiControlNetModel(AbstractMultiControlNet[FluxControlNetModel]):
    """Flux ControlNets that act together: their residuals are summed, in order (diffusers' ``FluxMultiControlNetModel``).

    It holds the nets only; the denoiser runs each with its own control image, mode, scale and
    window. One ControlNet-Union may be given several times, once per control image and mode.

    Args:
        nets: two or more Flux ControlNets for the same transformer.
    """

    net_class = FluxControlNetModel


def flux_controlnets(component: FluxControlNetModel | FluxMultiControlNetModel) -> tuple[FluxControlNetModel, ...]:
    """The Flux ControlNets of a ``controlnet`` component, one or several, in order."""
    return (component,) if isinstance(component, FluxControlNetModel) else tuple(component)


def _zero_linear(layer: nn.Linear) -> nn.Linear:
    """A linear layer that starts at zero, so a new ControlNet leaves its transformer unchanged."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


__all__ = [
    "FluxControlNetModel",
    "FluxControlNetOutput",
    "FluxControlNetParams",
    "FluxMultiControlNetModel",
    "flux_block_residuals",
    "flux_controlnets",
    "sum_residuals",
]
