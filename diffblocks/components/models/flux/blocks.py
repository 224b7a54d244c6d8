"""The two Flux.1 block kinds: double-stream (MM-DiT) and single-stream (parallel attention + MLP)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from diffblocks.components.models.flux.layers import AdaLayerNormZero, FeedForward, JointAttention, SelfAttention
from diffblocks.components.models.layers.attention import ExtraKeysValues

_FP16_MAX = 65504.0


def _clip_fp16(x: Tensor) -> Tensor:
    # The residual stream of the real checkpoints exceeds the fp16 range; saturate rather than go inf.
    return x.clip(-_FP16_MAX, _FP16_MAX) if x.dtype == torch.float16 else x


class FluxTransformerBlock(nn.Module):
    """Double-stream block (Esser et al. 2024, MM-DiT): separate weights per stream, one joint attention.

    Each stream is modulated by its own adaLN-Zero (attention and MLP triples) from ``temb``.

    Args:
        dim: channels of both streams.
        num_attention_heads: attention heads.
        attention_head_dim: channels per head.
    """

    def __init__(self, dim: int, *, num_attention_heads: int, attention_head_dim: int) -> None:
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim, num_modulations=2)
        self.norm1_context = AdaLayerNormZero(dim, num_modulations=2)
        self.attn = JointAttention(dim, heads=num_attention_heads, head_dim=attention_head_dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim)
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff_context = FeedForward(dim)

    def forward(
        self,
        hidden_states: Float[Tensor, "batch img_seq dim"],
        encoder_hidden_states: Float[Tensor, "batch txt_seq dim"],
        *,
        temb: Float[Tensor, "batch dim"],
        rope: tuple[Tensor, Tensor],
        image_prompt: Sequence[ExtraKeysValues] = (),
    ) -> tuple[Float[Tensor, "batch txt_seq dim"], Float[Tensor, "batch img_seq dim"]]:
        """Return ``(encoder_hidden_states, hidden_states)``, text first as diffusers' blocks do.

        ``image_prompt``: a Flux IP-Adapter's image keys and values for this block (see ``JointAttention``).
        """
        img, (img_attn, img_mlp) = self.norm1(hidden_states, temb)
        txt, (txt_attn, txt_mlp) = self.norm1_context(encoder_hidden_states, temb)
        img, txt, prompted = self.attn(img, txt, rope=rope, image_prompt=image_prompt)

        hidden_states = hidden_states + img_attn.gate * img
        hidden_states = hidden_states + img_mlp.gate * self.ff(img_mlp.apply(self.norm2(hidden_states)))
        if prompted is not None:
            # XLabs' IP-Adapter adds its attention after the MLP, ungated and unprojected (as diffusers does)
            hidden_states = hidden_states + prompted

        encoder_hidden_states = encoder_hidden_states + txt_attn.gate * txt
        txt = self.ff_context(txt_mlp.apply(self.norm2_context(encoder_hidden_states)))
        encoder_hidden_states = encoder_hidden_states + txt_mlp.gate * txt
        return _clip_fp16(encoder_hidden_states), hidden_states


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block (Dehghani et al. 2023, parallel layers): attention and MLP side by side.

    Text and image tokens are concatenated; one adaLN-Zero triple modulates the input and gates a
    single output projection fed by both the attention heads and the MLP hidden units.

    Args:
        dim: channels of the stream.
        num_attention_heads: attention heads.
        attention_head_dim: channels per head.
        mlp_ratio: MLP hidden width over ``dim``.
    """

    def __init__(
        self, dim: int, *, num_attention_heads: int, attention_head_dim: int, mlp_ratio: float = 4.0
    ) -> None:
        super().__init__()
        mlp_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZero(dim, num_modulations=1)
        self.proj_mlp = nn.Linear(dim, mlp_dim)
        self.attn = SelfAttention(dim, heads=num_attention_heads, head_dim=attention_head_dim)
        self.proj_out = nn.Linear(dim + mlp_dim, dim)

    def forward(
        self,
        hidden_states: Float[Tensor, "batch img_seq dim"],
        encoder_hidden_states: Float[Tensor, "batch txt_seq dim"],
        *,
        temb: Float[Tensor, "batch dim"],
        rope: tuple[Tensor, Tensor],
    ) -> tuple[Float[Tensor, "batch txt_seq dim"], Float[Tensor, "batch img_seq dim"]]:
        """Return ``(encoder_hidden_states, hidden_states)``; ``rope`` covers text then image positions."""
        txt_len = encoder_hidden_states.shape[1]
        residual = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        x, (mod,) = self.norm(residual, temb)
        mlp = F.gelu(self.proj_mlp(x), approximate="tanh")
        x = residual + mod.gate * self.proj_out(torch.cat([self.attn(x, rope=rope), mlp], dim=2))
        x = _clip_fp16(x)
        return x[:, :txt_len], x[:, txt_len:]
