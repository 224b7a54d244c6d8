"""An IP-Adapter: an image projection and decoupled cross-attention keys and values for a UNet's layers.

Ye et al. 2023, section 3.2: each cross-attention layer of the UNet also attends, with the same
queries, to image tokens through its own key and value projections (``to_k_ip``, ``to_v_ip``), and
adds the result at a scale: ``Attention(Q, K, V) + scale * Attention(Q, K_ip, V_ip)``. The UNet's
weights stay as they are; the adapter is a component of its own, and the denoiser hands the
layers their image keys and values (:meth:`IPAdapterModel.extras`).

Which file key belongs to which layer (``ip_adapter.N``, N odd) is fixed by diffusers' order of
the UNet's attention processors: every ``attn1`` and ``attn2`` of the down blocks, then the up
blocks, then the mid block, numbered from 0; the file keeps the ``attn2`` ones.

======  ==================================================================
N       our layer (SD 1.5: 16 cross-attention layers)
======  ==================================================================
1..11   ``down_blocks.{0,1,2}.attentions.{0,1}.transformer_blocks.0.attn2``
13..29  ``up_blocks.{1,2,3}.attentions.{0,1,2}.transformer_blocks.0.attn2``
31      ``mid_block.attentions.0.transformer_blocks.0.attn2``
======  ==================================================================

In general N = 2 i + 1 for the i-th ``attn2`` in that order (:func:`cross_attention_layers`), over
every transformer block of every spatial transformer (SDXL's hold 2 or 10: 70 layers, N = 1..139).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import final
from weakref import WeakKeyDictionary

from jaxtyping import Float
from torch import Tensor, nn

from diffblocks.components.compiled import unwrap_compiled
from diffblocks.components.models.ip_adapter.faceid import FaceIDPlusProjection, FaceIDProjection, FaceIDProjector
from diffblocks.components.models.ip_adapter.lora import AttentionDims, AttentionLoRA, add_lora, lora_of
from diffblocks.components.models.ip_adapter.projection import ImageProjector
from diffblocks.components.models.layers.attention import Attention, CrossAttentionExtras, ExtraKeysValues

_MSG_FIT = (
    "the IP-Adapter ({adapter}) does not fit the UNet ({unet}): {detail}. "
    "An IP-Adapter is trained for one base model: load the one made for this UNet's family and size"
)


# the layers of each UNet seen, found once: the denoiser asks at every pass, and a walk over SDXL's modules costs ~1 ms
_LAYERS: WeakKeyDictionary[nn.Module, list[tuple[str, Attention]]] = WeakKeyDictionary()
_CROSS: WeakKeyDictionary[nn.Module, list[tuple[str, Attention]]] = WeakKeyDictionary()


def attention_layers(unet: nn.Module) -> list[tuple[str, Attention]]:
    """Every attention layer of the UNet (``attn1`` and ``attn2``) in diffusers' processor order: down blocks, up blocks, mid block.

    The N-th is ``ip_adapter.N`` of an IP-Adapter file (a FaceID file's LoRA has one per layer).
    The UNet's modules are not expected to be replaced afterwards (LoRA and compilation keep them).
    """
    unet = unwrap_compiled(unet)  # a torch.compile wrapper prefixes every name with _orig_mod
    found = _LAYERS.get(unet)
    if found is None:
        found = [
            (name, module) for name, module in unet.named_modules() if name.endswith((".attn1", ".attn2")) and isinstance(module, Attention)
        ]
        order = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
        # sorted() is stable: within a part the modules keep their registration order, which is diffusers'
        found = _LAYERS[unet] = sorted(found, key=lambda item: order.get(item[0].split(".")[0], 3))
    return list(found)


def cross_attention_layers(unet: nn.Module) -> list[tuple[str, Attention]]:
    """The UNet's cross-attention layers in diffusers' processor order: down blocks, up blocks, mid block.

    The i-th is ``ip_adapter.{2i+1}`` in an IP-Adapter file (see the module's table).
    """
    unet = unwrap_compiled(unet)
    found = _CROSS.get(unet)
    if found is None:
        found = _CROSS[unet] = [(name, attn) for name, attn in attention_layers(unet) if name.endswith(".attn2")]
    return list(found)


def attention_dims(unet: nn.Module) -> list[AttentionDims]:
    """The widths of every attention layer of :func:`attention_layers`, which a FaceID LoRA must match.

    Read from the layers' key widths (``Attention.key_dims``), which LoRA and quantization keep: a
    cross-attention layer's queries read what its transformer block's self-attention reads.
    """
    dims: list[AttentionDims] = []
    query: dict[str, int] = {}
    for name, attn in attention_layers(unet):
        source, inner = attn.key_dims
        block = name.rpartition(".")[0]
        if name.endswith(".attn1"):
            query[block] = source
        dims.append(AttentionDims(query.get(block, inner), source, inner))
    return dims


@final
class IPAttentionLayer(nn.Module):
    """The image keys and values of one cross-attention layer (``ip_adapter.N`` of the file), and a FaceID file's LoRA of it."""

    def __init__(self, cross_attention_dim: int, inner_dim: int, *, lora: tuple[AttentionDims, int] | None = None) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        if lora is not None:
            add_lora(self, *lora)


@final
class IPAdapterModel(nn.Module):
    """One IP-Adapter: ``image_proj`` (CLIP features to image tokens) and ``ip_adapter.N`` per cross-attention layer.

    Its state dict is the file's (``image_proj.*``, ``ip_adapter.N.to_k_ip.weight``, ...), so
    :func:`~diffblocks.components.models.ip_adapter.load_ip_adapter_file` loads it as it is. The
    scales (one per cross-attention layer, 1.0 at first) are set with :meth:`set_scales`; layers at
    scale 0 are skipped. A FaceID adapter also holds its file's LoRA of every attention layer
    (``ip_adapter.N.to_q_lora.down.weight``, ...), which the pipeline attaches to the UNet.

    Args:
        image_proj: the image projection (plain, full-face, plus, FaceID or FaceID-Plus).
        layer_dims: ``(cross_attention_dim, inner_dim)`` of each cross-attention layer, in the file's order.
        lora_dims: FaceID's LoRA: the widths of every attention layer (:func:`attention_dims`, two
            per cross-attention layer), or empty for none.
        lora_rank: the LoRA's rank (128 in the released FaceID files).

    Example:
        >>> from diffblocks.components.models.ip_adapter import ImageProjection
        >>> adapter = IPAdapterModel(ImageProjection(16, 8), [(8, 32), (8, 64)])
        >>> sorted(adapter.state_dict())[:3]
        ['image_proj.norm.bias', 'image_proj.norm.weight', 'image_proj.proj.bias']
        >>> adapter.ip_adapter["3"].to_k_ip.weight.shape
        torch.Size([64, 8])
    """

    def __init__(
        self,
        image_proj: ImageProjector | FaceIDProjector,
        layer_dims: Sequence[tuple[int, int]],
        *,
        lora_dims: Sequence[AttentionDims] = (),
        lora_rank: int = 128,
    ) -> None:
        super().__init__()
        if lora_dims and len(lora_dims) != 2 * len(layer_dims):
            raise ValueError(
                f"lora_dims has {len(lora_dims)} attention layers but {len(layer_dims)} cross-attention layers need "
                f"{2 * len(layer_dims)} (a self- and a cross-attention layer each): give attention_dims(unet)"
            )
        self.image_proj = image_proj
        self.lora_dims = tuple(AttentionDims(*dims) for dims in lora_dims)
        layers: dict[str, nn.Module] = {}
        for i, (cross, inner) in enumerate(layer_dims):
            if self.lora_dims:
                layers[str(2 * i)] = AttentionLoRA(self.lora_dims[2 * i], lora_rank)
            lora = (self.lora_dims[2 * i + 1], lora_rank) if self.lora_dims else None
            layers[str(2 * i + 1)] = IPAttentionLayer(cross, inner, lora=lora)
        self.ip_adapter = nn.ModuleDict(layers)
        self.scales: tuple[float, ...] = (1.0,) * len(layer_dims)

    @property
    def layers(self) -> list[IPAttentionLayer]:
        """The per-layer projections in the file's order."""
        return [layer for layer in self.ip_adapter.values() if isinstance(layer, IPAttentionLayer)]

    @property
    def reads_hidden_states(self) -> bool:
        """Whether it reads the image encoder's penultimate hidden states (plus, full-face) rather than its projected embedding."""
        return self.image_proj.reads_hidden_states

    @property
    def reads_face_embeddings(self) -> bool:
        """Whether it reads a face-recognition embedding (FaceID, FaceID-Plus), which insightface computes, not a CLIP feature."""
        return isinstance(self.image_proj, (FaceIDProjection, FaceIDPlusProjection))

    @property
    def clip_dim(self) -> int | None:
        """FaceID-Plus: the width of the CLIP hidden states of the face it also reads; None for the others."""
        return self.image_proj.clip_dim if isinstance(self.image_proj, FaceIDPlusProjection) else None

    @property
    def embed_dim(self) -> int:
        """The image feature width it reads (the face embedding's, for FaceID)."""
        return next(module for module in self.image_proj.modules() if isinstance(module, nn.Linear)).in_features

    @property
    def cross_attention_dim(self) -> int:
        return self.layers[0].to_k_ip.in_features

    def lora_updates(self, unet: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
        """A FaceID file's LoRA as ``{UNet module path: (down, up)}`` at scale 1; empty for the other kinds."""
        if not self.lora_dims:
            return {}
        updates: dict[str, tuple[Tensor, Tensor]] = {}
        for n, (name, _) in enumerate(attention_layers(unet)):
            updates.update({f"{name}.{target}": pair for target, pair in lora_of(self.ip_adapter[str(n)]).items()})
        return updates

    def set_scales(self, scales: float | Sequence[float]) -> None:
        """One scale for every layer, or one per layer in the file's order."""
        values = (float(scales),) * len(self.layers) if isinstance(scales, (int, float)) else tuple(float(s) for s in scales)
        if len(values) != len(self.layers):
            raise ValueError(f"the IP-Adapter has {len(self.layers)} cross-attention layers but {len(values)} scales were given")
        self.scales = values

    def project(
        self, features: Float[Tensor, "batch images ..."], *, clip: Tensor | None = None, shortcut_scale: float | None = None
    ) -> Float[Tensor, "batch tokens dim"]:
        """Image tokens from ``(batch, images, ...)`` features: each image projected, their tokens joined.

        FaceID-Plus also reads ``clip``, ``(batch, images, seq, clip_dim)`` CLIP hidden states of the
        faces, and adds its identity tokens at ``shortcut_scale`` when one is given (PlusV2).
        """
        batch, images = features.shape[:2]
        param = next(self.image_proj.parameters())
        flat = features.flatten(0, 1).to(device=param.device, dtype=param.dtype)
        if isinstance(self.image_proj, FaceIDPlusProjection):
            if clip is None:
                raise ValueError("a FaceID-Plus adapter also reads CLIP hidden states of the faces: give clip")
            faces = clip.flatten(0, 1).to(device=param.device, dtype=param.dtype)
            tokens = self.image_proj(flat, faces, shortcut_scale=shortcut_scale)
        else:
            tokens = self.image_proj(flat)
        return tokens.reshape(batch, images * tokens.shape[1], tokens.shape[2])

    def mismatch(self, unet: nn.Module) -> str | None:
        """Why this adapter cannot act on ``unet`` (naming both shapes), or None when it fits."""
        layers = cross_attention_layers(unet)
        ours = [(layer.to_k_ip.in_features, layer.to_k_ip.out_features) for layer in self.layers]
        theirs = [attn.key_dims for _, attn in layers]  # not to_k's own: LoRA may have wrapped it
        if ours == theirs:
            return self._lora_mismatch(unet) if self.lora_dims else None
        adapter = f"{len(ours)} cross-attention layers, cross_attention_dim {ours[0][0] if ours else None}"
        target = f"{len(theirs)} cross-attention layers, cross_attention_dim {theirs[0][0] if theirs else None}"
        if len(ours) != len(theirs):
            detail = f"{len(ours)} layers vs {len(theirs)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
            detail = f"ip_adapter.{2 * i + 1} has (cross_attention_dim, width) {ours[i]} but {layers[i][0]} has {theirs[i]}"
        return _MSG_FIT.format(adapter=adapter, unet=target, detail=detail)

    def _lora_mismatch(self, unet: nn.Module) -> str | None:
        """Why this adapter's FaceID LoRA does not fit ``unet``'s attention layers, or None."""
        layers = attention_layers(unet)
        for n, ((name, _), ours, theirs) in enumerate(zip(layers, self.lora_dims, attention_dims(unet), strict=True)):
            if ours != theirs:
                detail = f"the LoRA of ip_adapter.{n} has widths {tuple(ours)} (query, source, inner) but {name} has {tuple(theirs)}"
                return _MSG_FIT.format(adapter="FaceID LoRA", unet=f"{len(layers)} attention layers", detail=detail)
        return None

    def extras(self, unet: nn.Module, tokens: Float[Tensor, "batch tokens dim"]) -> list[tuple[Attention, ExtraKeysValues]]:
        """Each layer's image keys and values (``to_k_ip``, ``to_v_ip`` of ``tokens``) and scale; layers at scale 0 are left out."""
        pairs = zip(cross_attention_layers(unet), self.layers, self.scales, strict=True)
        return [(attn, (layer.to_k_ip(tokens), layer.to_v_ip(tokens), scale)) for (_, attn), layer, scale in pairs if scale != 0.0]


@final
class MultiIPAdapterModel(nn.Module):
    """IP-Adapters that act together, each with its own image: their image attentions are added, in order.

    Args:
        adapters: two or more IP-Adapters for the same UNet.
    """

    def __init__(self, adapters: Iterable[IPAdapterModel]) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(adapters)
        if len(self.adapters) < 2:
            raise ValueError(f"MultiIPAdapterModel takes two or more IP-Adapters, got {len(self.adapters)}: give one IPAdapterModel as it is")
        for i, adapter in enumerate(self.adapters):
            if not isinstance(adapter, IPAdapterModel):
                raise TypeError(f"MultiIPAdapterModel takes IPAdapterModels, but adapter {i} is a {type(adapter).__name__}")

    def __len__(self) -> int:
        return len(self.adapters)

    def __iter__(self) -> Iterator[IPAdapterModel]:
        return (adapter for adapter in self.adapters if isinstance(adapter, IPAdapterModel))


def ip_adapters(component: IPAdapterModel | MultiIPAdapterModel) -> tuple[IPAdapterModel, ...]:
    """The IP-Adapters of an ``ip_adapter`` component, one or several, in order."""
    return (component,) if isinstance(component, IPAdapterModel) else tuple(component)


def cross_attention_extras(
    component: IPAdapterModel | MultiIPAdapterModel, unet: nn.Module, tokens: Sequence[Tensor]
) -> CrossAttentionExtras:
    """What the UNet's cross-attention layers also attend to: each adapter's image keys and values, by layer.

    Args:
        component: the adapters.
        unet: the UNet they act on.
        tokens: one ``(batch, tokens, dim)`` tensor of projected image tokens per adapter, in order.
    """
    adapters = ip_adapters(component)
    if len(tokens) != len(adapters):
        raise ValueError(f"Conditioning.image_embeds has {len(tokens)} tensors but {len(adapters)} IP-Adapters are attached: give one per adapter")
    extras: dict[nn.Module, list[ExtraKeysValues]] = {}
    for adapter, image_tokens in zip(adapters, tokens, strict=True):
        for attn, extra in adapter.extras(unet, image_tokens):
            extras.setdefault(attn, []).append(extra)
    return extras


__all__ = [
    "IPAdapterModel",
    "IPAttentionLayer",
    "MultiIPAdapterModel",
    "attention_dims",
    "attention_layers",
    "cross_attention_extras",
    "cross_attention_layers",
    "ip_adapters",
]
