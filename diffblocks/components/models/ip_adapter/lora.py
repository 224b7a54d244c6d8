"""The LoRA an IP-Adapter FaceID file carries for the UNet's attention layers, held in the file's layout.

A FaceID file adds, beside each cross-attention layer's image keys and values, a low-rank update
to the query, key, value and output projections of every attention layer of the UNet, self- and
cross-attention alike: ``ip_adapter.N.to_q_lora.down.weight``, ``...to_q_lora.up.weight``, and the
same for ``to_k_lora``, ``to_v_lora`` and ``to_out_lora``, for N = 0, 1, 2, ... over every
attention layer in diffusers' processor order (``attn1`` of a transformer block at N even, its
``attn2`` at N + 1). The original applies them at scale 1 (``LoRALinearLayer`` without
``network_alpha``): ``to_q(x) + up(down(x))``.

These modules only hold the weights, so that an adapter's state dict is its file; the pipeline
attaches them to the UNet through :mod:`diffblocks.components.lora` (``docs/ip_adapter.md``).
"""

from __future__ import annotations

from typing import NamedTuple, final

from torch import Tensor, nn

LORA_PROJECTIONS = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
"""The file's name of each update, and the attention projection (our module path inside the layer) it updates."""


class AttentionDims(NamedTuple):
    """The widths of one attention layer: its queries' input, its keys' and values' input, and its inner width."""

    query: int
    source: int
    inner: int


@final
class LoRAPair(nn.Module):
    """One low-rank update, ``up(down(x))`` at scale 1 (the original's ``LoRALinearLayer``)."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)


@final
class AttentionLoRA(nn.Module):
    """The LoRA of one self-attention layer (``ip_adapter.N``, N even), which has no image keys and values."""

    def __init__(self, dims: AttentionDims, rank: int) -> None:
        super().__init__()
        add_lora(self, dims, rank)


def add_lora(module: nn.Module, dims: AttentionDims, rank: int) -> None:
    """Give ``module`` the four updates of an attention layer of ``dims`` as children, named as in the file."""
    module.add_module("to_q_lora", LoRAPair(dims.query, dims.inner, rank))
    module.add_module("to_k_lora", LoRAPair(dims.source, dims.inner, rank))
    module.add_module("to_v_lora", LoRAPair(dims.source, dims.inner, rank))
    module.add_module("to_out_lora", LoRAPair(dims.inner, dims.query, rank))


def lora_of(module: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """``{projection path: (down, up)}`` of the updates ``module`` holds (none: empty), detached."""
    children = dict(module.named_children())
    found: dict[str, tuple[Tensor, Tensor]] = {}
    for name, target in LORA_PROJECTIONS.items():
        pair = children.get(name)
        if isinstance(pair, LoRAPair):
            found[target] = (pair.down.weight.detach(), pair.up.weight.detach())
    return found


__all__ = ["LORA_PROJECTIONS", "AttentionDims", "AttentionLoRA", "LoRAPair", "add_lora", "lora_of"]
