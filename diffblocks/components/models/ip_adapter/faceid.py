"""IP-Adapter FaceID's projections: a face-recognition embedding (insightface's) to the tokens the UNet's cross-attention reads.

Ye et al., "IP-Adapter-FaceID" (the ``ip_adapter`` package's ``ip_adapter_faceid.py``): instead of a
CLIP image embedding, the projection reads the 512-wide identity embedding of a face that
insightface's ArcFace model computes (``face.normed_embedding``). FaceID-Plus also reads CLIP's
penultimate hidden states of the face crop, through a perceiver whose latents are the identity
tokens; PlusV2 adds the identity tokens back at a "shortcut" scale. The files' LoRA, which
every FaceID adapter adds to the UNet's attention layers, is held by
:class:`~diffblocks.components.models.ip_adapter.IPAdapterModel` beside the projection.

Module names follow the original (``MLPProjModel``, ``ProjPlusModel``, ``FacePerceiverResampler``),
so the ``image_proj.*`` tensors of its files load as they are; diffusers reads the same files into
``IPAdapterFaceIDImageProjection`` and ``IPAdapterFaceIDPlusImageProjection``.
"""

from __future__ import annotations

from typing import final

from jaxtyping import Float
from torch import Tensor, nn

from diffblocks.components.models.ip_adapter.projection import PerceiverAttention, feed_forward

_MSG_INCOMPLETE = "this IP-Adapter FaceID file's image_proj lacks {missing} (keys found: {keys})"


@final
class FaceIDProjection(nn.Module):
    """IP-Adapter FaceID's projection: an identity embedding through an MLP to ``num_tokens`` tokens.

    Args:
        id_dim: the face embedding's width (512 for insightface's ArcFace).
        cross_attention_dim: the UNet's text width.
        num_tokens: image tokens made (4 in the released files).
        mult: the MLP's expansion (2 in the released files).
    """

    reads_hidden_states = False

    def __init__(self, id_dim: int, cross_attention_dim: int, *, num_tokens: int = 4, mult: int = 2) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Sequential(nn.Linear(id_dim, id_dim * mult), nn.GELU(), nn.Linear(id_dim * mult, cross_attention_dim * num_tokens))
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, id_embeds: Float[Tensor, "batch id"]) -> Float[Tensor, "batch tokens dim"]:
        return self.norm(self.proj(id_embeds).unflatten(-1, (self.num_tokens, -1)))


@final
class FacePerceiverResampler(nn.Module):
    """FaceID-Plus's perceiver: the identity tokens (as latents) attend to CLIP's hidden states of the face.

    ``layers.i`` is ``(PerceiverAttention, feed-forward)``, each with a residual, as in the plus
    IP-Adapter's :class:`~diffblocks.components.models.ip_adapter.Resampler`, but without learned latents.
    """

    def __init__(self, dim: int, clip_dim: int, output_dim: int, *, depth: int, heads: int, ff_mult: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(clip_dim, dim)
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(dim, heads=heads), feed_forward(dim, ff_mult)]) for _ in range(depth))
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def forward(self, latents: Float[Tensor, "batch n dim"], clip: Float[Tensor, "batch seq clip"]) -> Float[Tensor, "batch n out"]:
        x = self.proj_in(clip)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


@final
class FaceIDPlusProjection(nn.Module):
    """IP-Adapter FaceID-Plus (and PlusV2): identity tokens refined by CLIP's hidden states of the face crop.

    ``shortcut_scale`` None is FaceID-Plus; a number is PlusV2, whose output adds the identity
    tokens at that scale (the original's ``shortcut=True, s_scale=...``).

    Args:
        id_dim: the face embedding's width (512).
        clip_dim: the CLIP image encoder's hidden width (1280 for ViT-H).
        cross_attention_dim: the UNet's text width, which is also the perceiver's.
        num_tokens: image tokens made (4).
        mult: the identity MLP's expansion (2).
        depth: perceiver layers (4).
        heads: perceiver attention heads of 64 channels (``cross_attention_dim // 64`` in the original).
        ff_mult: the perceiver's feed-forward expansion (4).
    """

    reads_hidden_states = False

    def __init__(
        self, id_dim: int, clip_dim: int, cross_attention_dim: int, *, num_tokens: int = 4, mult: int = 2, depth: int = 4,
        heads: int | None = None, ff_mult: int = 4,
    ) -> None:  # fmt: skip
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Sequential(nn.Linear(id_dim, id_dim * mult), nn.GELU(), nn.Linear(id_dim * mult, cross_attention_dim * num_tokens))
        self.norm = nn.LayerNorm(cross_attention_dim)
        heads = heads if heads is not None else max(1, cross_attention_dim // 64)
        self.perceiver_resampler = FacePerceiverResampler(
            cross_attention_dim, clip_dim, cross_attention_dim, depth=depth, heads=heads, ff_mult=ff_mult
        )

    @property
    def clip_dim(self) -> int:
        """The CLIP hidden width it reads."""
        return self.perceiver_resampler.proj_in.in_features

    def forward(
        self, id_embeds: Float[Tensor, "batch id"], clip: Float[Tensor, "batch seq clip"], *, shortcut_scale: float | None = None
    ) -> Float[Tensor, "batch tokens dim"]:
        tokens = self.norm(self.proj(id_embeds).unflatten(-1, (self.num_tokens, -1)))
        out = self.perceiver_resampler(tokens, clip.to(tokens.dtype))
        return out if shortcut_scale is None else tokens + shortcut_scale * out


FaceIDProjector = FaceIDProjection | FaceIDPlusProjection
"""The projections of FaceID files."""


def faceid_projection_from_state_dict(tensors: dict[str, Tensor]) -> FaceIDProjector | None:
    """The FaceID projection whose parameters ``tensors`` (``image_proj.*``, prefix removed) are, unloaded; None for other kinds.

    Recognised as diffusers recognises them: ``perceiver_resampler.*`` is FaceID-Plus, ``norm.weight``
    with ``proj.0.weight`` (and no ``proj.3``, the full-face MLP) plain FaceID.

    Raises:
        ValueError: a FaceID projection with tensors missing, naming them.
    """
    plus = any(key.startswith("perceiver_resampler.") for key in tensors)
    if not plus and not ("norm.weight" in tensors and "proj.0.weight" in tensors and "proj.3.weight" not in tensors):
        return None
    wanted = ["proj.0.weight", "proj.2.weight", "norm.weight"]
    if plus:
        inner = ("proj_in.weight", "proj_out.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight")
        wanted += [f"perceiver_resampler.{key}" for key in inner]
    missing = [key for key in wanted if key not in tensors]
    if missing:
        raise ValueError(_MSG_INCOMPLETE.format(missing=missing, keys=sorted(tensors)[:8]))
    first, second, cross = tensors["proj.0.weight"].shape, tensors["proj.2.weight"].shape, tensors["norm.weight"].shape[0]
    id_dim, mult, num_tokens = first[1], first[0] // first[1], second[0] // cross
    if not plus:
        return FaceIDProjection(id_dim, cross, num_tokens=num_tokens, mult=mult)
    depth = 1 + max(int(key.split(".")[2]) for key in tensors if key.startswith("perceiver_resampler.layers."))
    return FaceIDPlusProjection(
        id_dim,
        tensors["perceiver_resampler.proj_in.weight"].shape[1],
        cross,
        num_tokens=num_tokens,
        mult=mult,
        depth=depth,
        heads=tensors["perceiver_resampler.layers.0.0.to_q.weight"].shape[0] // 64,
        ff_mult=tensors["perceiver_resampler.layers.0.1.1.weight"].shape[0] // cross,
    )


__all__ = ["FaceIDPlusProjection", "FaceIDProjection", "FaceIDProjector", "FacePerceiverResampler", "faceid_projection_from_state_dict"]
