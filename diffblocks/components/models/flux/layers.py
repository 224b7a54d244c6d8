"""Layers shared by the Flux.1 blocks: adaLN modulation, the GELU MLP, and joint QK-normed attention."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from diffblocks.components.attention import attention
from diffblocks.components.models.flux.embeddings import apply_rope
from diffblocks.components.models.layers.attention import ExtraKeysValues


@dataclass(frozen=True)
class ModulationOut:
    """One adaLN triple, each ``(batch, 1, dim)`` so it broadcasts over tokens."""

    shift: Tensor
    scale: Tensor
    gate: Tensor

    def apply(self, x: Float[Tensor, "batch seq dim"]) -> Float[Tensor, "batch seq dim"]:
        return x * (1 + self.scale) + self.shift


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero (Peebles & Xie 2023): LayerNorm shifted and scaled by the conditioning, plus residual gates.

    Args:
        dim: channels of the stream and of the conditioning vector.
        num_modulations: triples to produce; 2 (attention, MLP) in double blocks, 1 in single blocks.
    """

    def __init__(self, dim: int, *, num_modulations: int) -> None:
        super().__init__()
        self.num_modulations = num_modulations
        self.linear = nn.Linear(dim, 3 * num_modulations * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(
        self, x: Float[Tensor, "batch seq dim"], temb: Float[Tensor, "batch dim"]
    ) -> tuple[Tensor, tuple[ModulationOut, ...]]:
        """The first triple applied to ``norm(x)``, and all triples in checkpoint order.

        ``temb`` is the conditioning already passed through SiLU (the transformer applies it once).
        """
        chunks = self.linear(temb)[:, None, :].chunk(3 * self.num_modulations, dim=-1)
        mods = tuple(ModulationOut(*chunks[i : i + 3]) for i in range(0, len(chunks), 3))
        return mods[0].apply(self.norm(x)), mods


class AdaLayerNormContinuous(nn.Module):
    """Final adaptive LayerNorm: scale and shift (in that checkpoint order) from the conditioning, no gate."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: Float[Tensor, "batch seq dim"], temb: Float[Tensor, "batch dim"]) -> Tensor:
        """``temb`` is the conditioning already passed through SiLU (the transformer applies it once)."""
        scale, shift = self.linear(temb.to(x.dtype))[:, None, :].chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class GELUProjection(nn.Module):
    """Linear followed by tanh-approximated GELU."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Transformer MLP ``dim -> 4 dim -> dim`` with tanh-GELU."""

    def __init__(self, dim: int, *, mult: int = 4) -> None:
        super().__init__()
        # Checkpoints name the layers net.0 and net.2 (slot 1 held a dropout that Flux never uses).
        self.net = nn.Sequential(
            OrderedDict([("0", GELUProjection(dim, mult * dim)), ("2", nn.Linear(mult * dim, dim))])
        )

    def forward(self, x: Float[Tensor, "batch seq dim"]) -> Float[Tensor, "batch seq dim"]:
        return self.net(x)


def _split_heads(x: Float[Tensor, "batch seq inner"], heads: int) -> Float[Tensor, "batch seq heads head_dim"]:
    # Heads stay behind the sequence axis until the attention call, so QK-norm and RoPE run on
    # contiguous memory; the seam gets (batch, heads, seq, head_dim) views.
    return x.unflatten(-1, (heads, -1))


def _attend(q: Tensor, k: Tensor, v: Tensor) -> Float[Tensor, "batch seq inner"]:
    """Attention over ``(batch, seq, heads, head_dim)`` tensors through the one attention seam."""
    # plain transposes rather than einops: this runs in every block at every step (see layers/attention.py)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return attention(q, k, v).transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with RMS-normed queries and keys and RoPE, without output projection.

    Single blocks fuse the output projection with their MLP, so the heads come back unprojected.

    Args:
        dim: channels of the (text + image) stream.
        heads: attention heads.
        head_dim: channels per head.
    """

    def __init__(self, dim: int, *, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q = nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(head_dim, eps=1e-6)
        self.to_q = nn.Linear(dim, heads * head_dim)
        self.to_k = nn.Linear(dim, heads * head_dim)
        self.to_v = nn.Linear(dim, heads * head_dim)

    def forward(
        self, hidden_states: Float[Tensor, "batch seq dim"], *, rope: tuple[Tensor, Tensor]
    ) -> Float[Tensor, "batch seq inner"]:
        q, k, v = (_split_heads(proj(hidden_states), self.heads) for proj in (self.to_q, self.to_k, self.to_v))
        return _attend(apply_rope(self.norm_q(q), rope), apply_rope(self.norm_k(k), rope), v)


class JointAttention(nn.Module):
    """MM-DiT joint attention (Esser et al. 2024): text and image keep their own weights, attend as one.

    Queries and keys are RMS-normed per head and rotated by RoPE over the joint sequence, text first.

    Args:
        dim: channels of both streams.
        heads: attention heads.
        head_dim: channels per head.
    """

    def __init__(self, dim: int, *, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.norm_q = nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(head_dim, eps=1e-6)
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        # A list so the checkpoint key is to_out.0 (diffusers keeps a dropout in slot 1).
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.norm_added_q = nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_added_k = nn.RMSNorm(head_dim, eps=1e-6)
        self.add_q_proj = nn.Linear(dim, inner)
        self.add_k_proj = nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        self.to_add_out = nn.Linear(inner, dim)

    def forward(
        self,
        hidden_states: Float[Tensor, "batch img_seq dim"],
        encoder_hidden_states: Float[Tensor, "batch txt_seq dim"],
        *,
        rope: tuple[Tensor, Tensor],
        image_prompt: Sequence[ExtraKeysValues] = (),
    ) -> tuple[Float[Tensor, "batch img_seq dim"], Float[Tensor, "batch txt_seq dim"], Float[Tensor, "batch img_seq inner"] | None]:
        """Return ``(image, text, image prompt)`` outputs; ``rope`` covers ``txt_seq + img_seq`` positions.

        ``image_prompt`` are a Flux IP-Adapter's keys and values of image tokens, ``(batch, tokens,
        inner)`` each, with their scale (XLabs 2024): the image queries, RMS-normed but not rotated,
        attend to each, and the third output is the sum of those attentions at their scales, not
        projected (the block adds it to the residual stream); None without ``image_prompt``.
        """
        q, k, v = (_split_heads(proj(hidden_states), self.heads) for proj in (self.to_q, self.to_k, self.to_v))
        txt_projs = (self.add_q_proj, self.add_k_proj, self.add_v_proj)
        cq, ck, cv = (_split_heads(proj(encoder_hidden_states), self.heads) for proj in txt_projs)
        image_q = self.norm_q(q)
        q = apply_rope(torch.cat([self.norm_added_q(cq), image_q], dim=1), rope)
        k = apply_rope(torch.cat([self.norm_added_k(ck), self.norm_k(k)], dim=1), rope)
        out = _attend(q, k, torch.cat([cv, v], dim=1))
        txt, img = out.split([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        prompted = None
        for keys, values, scale in image_prompt:
            attended = scale * _attend(image_q, _split_heads(keys, self.heads), _split_heads(values, self.heads))
            prompted = attended if prompted is None else prompted + attended
        # Strided views take another half-precision GEMM path; contiguous inputs round like diffusers.
        return self.to_out[0](img.contiguous()), self.to_add_out(txt.contiguous()), prompted
