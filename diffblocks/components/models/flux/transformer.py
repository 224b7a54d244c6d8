"""The Flux.1 transformer (dev and schnell), weight-compatible with diffusers' ``FluxTransformer2DModel``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar, final

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from diffblocks.components.models.base import AbstractModel
from diffblocks.components.models.flux.blocks import FluxSingleTransformerBlock, FluxTransformerBlock
from diffblocks.components.models.flux.embeddings import RotaryEmbedding, TimeTextEmbedding
from diffblocks.components.models.flux.layers import AdaLayerNormContinuous
from diffblocks.components.models.flux.params import FluxParams
from diffblocks.components.models.layers.attention import ExtraKeysValues

_MSG_IDS = (
    "{name} must be 2-D (seq, {axes}) without a batch axis, as prepare_image_ids / prepare_text_ids "
    "build them; got shape {shape}"
)
_MSG_RESIDUALS = (
    "block_residuals has {got} tensors, but the transformer takes one per double block ({double}) or one per block "
    "({every}): spread a ControlNet's residuals with flux_block_residuals"
)
_MSG_IMAGE_PROMPT = (
    "image_prompt has {got} entries, but the transformer takes one per double block ({double}): "
    "a Flux IP-Adapter's flux_image_prompt makes them"
)


@final
class FluxTransformer2DModel(AbstractModel[FluxParams]):
    """Flux.1 rectified-flow transformer (Black Forest Labs 2024): double-stream then single-stream blocks.

    Module and parameter names equal diffusers', so its folders load through ``from_pretrained``
    (and ``load_state_dict(strict=True)``), and diffusers-style module paths
    (``transformer_blocks.0``, ``single_transformer_blocks.3.attn``) address the same layers.

    Args:
        params: the model's hyper-parameters.

    Example:
        ```python
        params = FluxParams(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                            axes_dims_rope=(4, 6, 6))
        model = FluxTransformer2DModel(params)
        out = model(torch.randn(1, 4, 16), encoder_hidden_states=torch.randn(1, 3, 32),
                    pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
                    img_ids=prepare_image_ids(2, 2), txt_ids=prepare_text_ids(3))
        assert out.shape == (1, 4, 16)
        ```
    """

    Params = FluxParams
    diffusers_class_name = "FluxTransformer2DModel"
    repeated_blocks: ClassVar[tuple[type[nn.Module], ...]] = (FluxTransformerBlock, FluxSingleTransformerBlock)

    def __init__(self, params: FluxParams) -> None:
        super().__init__(params)
        dim, heads, head_dim = params.inner_dim, params.num_attention_heads, params.attention_head_dim
        self.x_embedder = nn.Linear(params.in_channels, dim)
        self.time_text_embed = TimeTextEmbedding(
            dim, pooled_projection_dim=params.pooled_projection_dim, guidance_embeds=params.guidance_embeds
        )
        self.context_embedder = nn.Linear(params.joint_attention_dim, dim)
        self.pos_embed = RotaryEmbedding(params.axes_dims_rope)
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(dim, num_attention_heads=heads, attention_head_dim=head_dim)
            for _ in range(params.num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(dim, num_attention_heads=heads, attention_head_dim=head_dim)
            for _ in range(params.num_single_layers)
        )
        self.norm_out = AdaLayerNormContinuous(dim)
        self.proj_out = nn.Linear(dim, params.patch_size**2 * params.resolved_out_channels)

    def forward(
        self,
        hidden_states: Float[Tensor, "batch img_seq in_channels"],
        *,
        encoder_hidden_states: Float[Tensor, "batch txt_seq joint_attention_dim"],
        pooled_projections: Float[Tensor, "batch pooled_projection_dim"],
        timestep: Float[Tensor, " batch"],
        img_ids: Float[Tensor, "img_seq 3"],
        txt_ids: Float[Tensor, "txt_seq 3"],
        guidance: Float[Tensor, " batch"] | None = None,
        block_residuals: Sequence[Float[Tensor, "batch img_seq dim"]] | None = None,
        image_prompt: Sequence[Sequence[ExtraKeysValues]] | None = None,
    ) -> Float[Tensor, "batch img_seq out_channels"]:
        """Predict the flow (velocity) for packed latent tokens.

        Args:
            hidden_states: packed latents (see ``pack_latents``).
            encoder_hidden_states: T5 token embeddings.
            pooled_projections: pooled CLIP embedding.
            timestep: sigma in 0..1, as diffusers' pipeline passes ``t / 1000``; scaled by 1000 here.
            img_ids: image position ids, ``prepare_image_ids``.
            txt_ids: text position ids, ``prepare_text_ids``.
            guidance: distilled guidance scale (e.g. 3.5) for guidance-embedding models, else None;
                like diffusers, the model multiplies it by 1000 too.
            block_residuals: ControlNet residuals added to the image tokens after each block: one
                per double block, then (optionally) one per single block, as
                :func:`~diffblocks.components.models.controlnet.flux_block_residuals` spreads them.
            image_prompt: a Flux IP-Adapter's image keys and values, one sequence per double block
                (:func:`~diffblocks.components.models.ip_adapter.flux_image_prompt` makes them).

        Returns:
            ``(batch, img_seq, patch_size**2 * out_channels)``, still packed.
        """
        for name, ids in (("img_ids", img_ids), ("txt_ids", txt_ids)):
            if ids.ndim != 2:
                axes = len(self.params.axes_dims_rope)
                raise ValueError(_MSG_IDS.format(name=name, axes=axes, shape=tuple(ids.shape)))
        hidden_states = self.x_embedder(hidden_states)
        # Cast before scaling, as diffusers does, so half-precision runs round identically.
        timestep = timestep.to(hidden_states.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(hidden_states.dtype) * 1000
        # every adaLN reads SiLU(temb): applied once here rather than in each of the ~60 norms
        temb = F.silu(self.time_text_embed(timestep, pooled_projections, guidance=guidance))
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        rope = self.pos_embed(torch.cat([txt_ids, img_ids], dim=0))
        residuals = self._residuals(block_residuals)
        if image_prompt is not None and len(image_prompt) != len(self.transformer_blocks):
            raise ValueError(_MSG_IMAGE_PROMPT.format(got=len(image_prompt), double=len(self.transformer_blocks)))

        for i, block in enumerate(self.transformer_blocks):
            prompt = () if image_prompt is None else image_prompt[i]
            encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb=temb, rope=rope, image_prompt=prompt)
            residual = next(residuals, None)
            if residual is not None:
                hidden_states = hidden_states + residual
        for block in self.single_transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb=temb, rope=rope)
            residual = next(residuals, None)
            if residual is not None:
                hidden_states = hidden_states + residual

        return self.proj_out(self.norm_out(hidden_states, temb))

    def _residuals(self, block_residuals: Sequence[Tensor] | None) -> Iterator[Tensor]:
        """The ControlNet residuals in block order; none, one per double block, or one per block."""
        if block_residuals is None:
            return iter(())
        double, every = self.params.num_layers, self.params.num_layers + self.params.num_single_layers
        if len(block_residuals) not in (double, every):
            raise ValueError(_MSG_RESIDUALS.format(got=len(block_residuals), double=double, every=every))
        return iter(block_residuals)
