"""The UNet's spatial transformer: self-attention, cross-attention to text, GEGLU feed-forward.

Rombach et al. 2022 (latent diffusion), section 3.3. Attribute names match diffusers'
``Transformer2DModel`` / ``BasicTransformerBlock`` / ``FeedForward``.
"""

from __future__ import annotations

from typing import final

import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from diffblocks.components.models.layers.attention import Attention, CrossAttentionExtras
from diffblocks.components.models.layers.norm import GroupNorm


@final
class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): ``a * gelu(b)`` for ``a, b = proj(x).chunk(2)``."""

    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim * 2)

    def forward(self, x: Float[Tensor, "batch seq dim"]) -> Float[Tensor, "batch seq inner"]:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


@final
class FeedForward(nn.Module):
    """GEGLU MLP with a 4x hidden width; ``net`` indices match diffusers (0 GEGLU, 1 dropout, 2 out)."""

    def __init__(self, dim: int, *, dropout: float = 0.0, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)])

    def forward(self, x: Float[Tensor, "batch seq dim"]) -> Float[Tensor, "batch seq dim"]:
        for layer in self.net:
            x = layer(x)
        return x


@final
class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention (``attn1``), cross-attention (``attn2``), feed-forward.

    Args:
        dim: token width.
        heads: attention heads.
        head_dim: channels per head.
        context_dim: width of the text embeddings attended to.
        dropout: attention and feed-forward dropout.
    """

    def __init__(self, dim: int, *, heads: int, head_dim: int, context_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, head_dim=head_dim, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads=heads, head_dim=head_dim, context_dim=context_dim, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(
        self,
        x: Float[Tensor, "batch seq dim"],
        context: Float[Tensor, "batch seq_k ctx"],
        *,
        context_mask: Tensor | None = None,
        extras: CrossAttentionExtras | None = None,
    ) -> Float[Tensor, "batch seq dim"]:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask=context_mask, extra=extras.get(self.attn2, ()) if extras else ())
        return x + self.ff(self.norm3(x))


@final
class SpatialTransformer(nn.Module):
    """Run transformer blocks over the pixels of a feature map, with a residual around them.

    diffusers calls this ``Transformer2DModel`` (continuous-input case).

    Args:
        channels: feature-map channels (also the token width).
        heads: attention heads; ``channels // heads`` channels per head.
        context_dim: width of the text embeddings.
        num_layers: transformer blocks.
        groups: GroupNorm groups of the input norm.
        use_linear_projection: ``proj_in``/``proj_out`` are Linear (SD2, SDXL) rather than 1x1 Conv.
        dropout: dropout inside the blocks.
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        context_dim: int,
        num_layers: int = 1,
        groups: int = 32,
        use_linear_projection: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        project = nn.Linear if use_linear_projection else _conv1x1
        self.proj_in = project(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                channels, heads=heads, head_dim=channels // heads, context_dim=context_dim, dropout=dropout
            )
            for _ in range(num_layers)
        )
        self.proj_out = project(channels, channels)

    def forward(
        self,
        x: Float[Tensor, "batch c height width"],
        context: Float[Tensor, "batch seq_k ctx"],
        *,
        context_mask: Tensor | None = None,
        extras: CrossAttentionExtras | None = None,
    ) -> Float[Tensor, "batch c height width"]:
        """``extras``: further keys and values for the blocks' cross-attention (IP-Adapter's image tokens)."""
        height = x.shape[-2]
        h = self.norm(x)
        # Linear projections act on tokens, 1x1 convolutions on the map: same maths, different weights' shape.
        if not self.use_linear_projection:
            h = self.proj_in(h)
        h = rearrange(h, "b c y x -> b (y x) c")
        if self.use_linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, context_mask=context_mask, extras=extras)
        if self.use_linear_projection:
            h = self.proj_out(h)
        # Contiguous like diffusers': the residual sum and the next convolutions then round identically.
        h = rearrange(h, "b (y x) c -> b c y x", y=height).contiguous()
        if not self.use_linear_projection:
            h = self.proj_out(h)
        return h + x


def _conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1)


__all__ = ["GEGLU", "BasicTransformerBlock", "FeedForward", "SpatialTransformer"]
