"""IP-Adapter's image projections: CLIP image features to the tokens the UNet's cross-attention reads.

Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion
Models", section 3.2. Module names follow the original ``ip_adapter`` package (``ImageProjModel``,
``MLPProjModel``, ``Resampler``), so the ``image_proj.*`` tensors of its files load as they are;
diffusers reads the same files and renames them (``ImageProjection``,
``IPAdapterFullImageProjection``, ``IPAdapterPlusImageProjection``).
"""

from __future__ import annotations

from typing import final

import torch
from jaxtyping import Float
from torch import Tensor, nn

from diffblocks.components.models.layers.attention import multihead


@final
class ImageProjection(nn.Module):
    """The plain IP-Adapter's projection: one CLIP image embedding to ``num_tokens`` tokens.

    Args:
        embed_dim: the image encoder's projected embedding width (``projection_dim``).
        cross_attention_dim: the UNet's text width.
        num_tokens: image tokens made (4 in every released plain IP-Adapter).
    """

    reads_hidden_states = False

    def __init__(self, embed_dim: int, cross_attention_dim: int, *, num_tokens: int = 4) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, embeds: Float[Tensor, "batch embed"]) -> Float[Tensor, "batch tokens dim"]:
        return self.norm(self.proj(embeds).unflatten(-1, (self.num_tokens, -1)))


@final
class MLPProjection(nn.Module):
    """IP-Adapter "full face": every CLIP hidden state (257 for ViT-H) through an MLP, one token each.

    Args:
        embed_dim: the image encoder's hidden width.
        cross_attention_dim: the UNet's text width.
    """

    reads_hidden_states = True

    def __init__(self, embed_dim: int, cross_attention_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, cross_attention_dim), nn.LayerNorm(cross_attention_dim)
        )

    def forward(self, hidden: Float[Tensor, "batch seq embed"]) -> Float[Tensor, "batch seq dim"]:
        return self.proj(hidden)


@final
class PerceiverAttention(nn.Module):
    """Learned latents attend to the image features and to themselves (Alayrac et al. 2022, Flamingo's resampler).

    ``norm1`` normalises the image features, ``norm2`` the latents; keys and values come from both,
    concatenated. No biases, as in the original.
    """

    def __init__(self, dim: int, *, heads: int, head_dim: int = 64) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Float[Tensor, "batch seq dim"], latents: Float[Tensor, "batch n dim"]) -> Float[Tensor, "batch n dim"]:
        x, latents = self.norm1(x), self.norm2(latents)
        keys, values = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)
        return self.to_out(multihead(self.to_q(latents), keys, values, heads=self.heads))


@final
class Resampler(nn.Module):
    """IP-Adapter "plus": a perceiver resampler of the CLIP hidden states into ``num_queries`` tokens.

    ``layers.i`` is ``(PerceiverAttention, feed-forward)``, each with a residual; the feed-forward
    is LayerNorm, Linear, GELU, Linear without biases (the original's ``FeedForward``).

    Args:
        embed_dim: the image encoder's hidden width (the penultimate hidden states are read).
        hidden_dim: the resampler's width.
        output_dim: the UNet's text width.
        depth: resampler layers.
        heads: attention heads of 64 channels.
        num_queries: image tokens made.
        ff_mult: feed-forward expansion.
    """

    reads_hidden_states = True

    def __init__(
        self, embed_dim: int, hidden_dim: int, output_dim: int, *, depth: int, heads: int, num_queries: int, ff_mult: int = 4
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, hidden_dim) / hidden_dim**0.5)
        self.proj_in = nn.Linear(embed_dim, hidden_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(hidden_dim, heads=heads), feed_forward(hidden_dim, ff_mult)]) for _ in range(depth)
        )
        self.proj_out = nn.Linear(hidden_dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def forward(self, hidden: Float[Tensor, "batch seq embed"]) -> Float[Tensor, "batch queries dim"]:
        latents = self.latents.expand(hidden.shape[0], -1, -1)
        x = self.proj_in(hidden)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """The perceivers' feed-forward: LayerNorm, Linear, GELU, Linear, without biases (the original's ``FeedForward``)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False))


ImageProjector = ImageProjection | MLPProjection | Resampler
"""The image projections a file may hold."""


def projection_from_state_dict(tensors: dict[str, Tensor]) -> ImageProjector:
    """The projection whose parameters ``tensors`` (the ``image_proj.*`` of a file, prefix removed) are, unloaded.

    Recognised as diffusers recognises them: ``proj.weight`` is the plain projection,
    ``proj.3.weight`` the full-face MLP, ``latents`` the resampler.

    FaceID's projections are read by :func:`~diffblocks.components.models.ip_adapter.faceid.faceid_projection_from_state_dict`.

    Raises:
        ValueError: another layout, naming the keys found.
    """
    if "proj.weight" in tensors:
        embed, cross = tensors["proj.weight"].shape[1], tensors["norm.weight"].shape[0]
        return ImageProjection(embed, cross, num_tokens=tensors["proj.weight"].shape[0] // cross)
    if "proj.3.weight" in tensors:
        return MLPProjection(tensors["proj.0.weight"].shape[1], tensors["proj.3.weight"].shape[0])
    if "latents" in tensors and "proj_in.weight" in tensors:
        depth = 1 + max(int(key.split(".")[1]) for key in tensors if key.startswith("layers."))
        hidden = tensors["latents"].shape[2]
        return Resampler(
            tensors["proj_in.weight"].shape[1],
            hidden,
            tensors["proj_out.weight"].shape[0],
            depth=depth,
            heads=tensors["layers.0.0.to_q.weight"].shape[0] // 64,
            num_queries=tensors["latents"].shape[1],
            ff_mult=tensors["layers.0.1.1.weight"].shape[0] // hidden,
        )
    raise ValueError(f"image_proj holds no IP-Adapter projection that is known (keys: {sorted(tensors)[:8]}): {_MSG_KINDS}")


_MSG_KINDS = (
    "the plain (proj.weight), full-face (proj.3.weight), plus (latents, a resampler), FaceID (proj.0.weight and norm.weight) "
    "and FaceID-Plus (perceiver_resampler.*) IP-Adapters are read"
)

__all__ = [
    "ImageProjection",
    "ImageProjector",
    "MLPProjection",
    "PerceiverAttention",
    "Resampler",
    "feed_forward",
    "projection_from_state_dict",
]
