"""Flux IP-Adapter (XLabs-AI 2024): an image prompt for the Flux.1 transformer's double blocks.

The IP-Adapter of Ye et al. 2023 carried over to MM-DiT: the plain projection turns one CLIP image
embedding into 4 tokens of the T5 width, and each double block's attention also attends, with its
image queries (RMS-normed, not rotated), to keys and values of those tokens made by two new
projections with biases (``to_k_ip``, ``to_v_ip``). The block adds that attention, at a scale, to
the image stream after its MLP, neither gated nor projected. Single blocks are left alone.

XLabs' file (``XLabs-AI/flux-ip-adapter``, ``ip_adapter.safetensors``) names the tensors

=====================================================================  ==========================
file key                                                               ours (``state_dict()``)
=====================================================================  ==========================
``ip_adapter_proj_model.{proj,norm}.{weight,bias}``                    ``image_proj.*``
``double_blocks.N.processor.ip_adapter_double_stream_k_proj.weight``   ``ip_adapter.N.to_k_ip.weight``
``double_blocks.N.processor.ip_adapter_double_stream_v_proj.bias``     ``ip_adapter.N.to_v_ip.bias``
=====================================================================  ==========================

with N the double block, from 0. diffusers reads both namings (its ``FluxIPAdapterMixin``); we
read both and write XLabs' (:meth:`FluxIPAdapterModel.xlabs_state_dict`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import cast, final

from jaxtyping import Float
from torch import Tensor, nn

from diffblocks.components.models.flux import FluxTransformer2DModel
from diffblocks.components.models.ip_adapter.projection import ImageProjection
from diffblocks.components.models.layers.attention import ExtraKeysValues

XLABS_PROJECTION = "ip_adapter_proj_model."
XLABS_LAYERS = "double_blocks."
_XLABS_NAMES = {"to_k_ip": "ip_adapter_double_stream_k_proj", "to_v_ip": "ip_adapter_double_stream_v_proj"}

_MSG_FIT = (
    "the IP-Adapter ({adapter}) does not fit the Flux transformer ({transformer}): {detail}. "
    "An IP-Adapter is trained for one base model: load the one made for this transformer"
)


@final
class FluxIPAttentionLayer(nn.Module):
    """The image keys and values of one double block (``double_blocks.N.processor`` of XLabs' file)."""

    def __init__(self, joint_attention_dim: int, inner_dim: int) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(joint_attention_dim, inner_dim)
        self.to_v_ip = nn.Linear(joint_attention_dim, inner_dim)


@final
class FluxIPAdapterModel(nn.Module):
    """One Flux IP-Adapter: ``image_proj`` (a CLIP image embedding to tokens) and keys and values per double block.

    The scales (one per double block, 1.0 at first, as diffusers' ``set_ip_adapter_scale`` takes
    them) are set with :meth:`set_scales`; blocks at scale 0 are skipped.

    Args:
        image_proj: the plain projection (XLabs': CLIP ViT-L/14's 768 to 4 tokens of 4096).
        num_layers: the transformer's double blocks (19 for Flux.1).
        inner_dim: the transformer's width (``num_attention_heads * attention_head_dim``, 3072).

    Example:
        >>> adapter = FluxIPAdapterModel(ImageProjection(16, 32), 2, inner_dim=64)
        >>> adapter.ip_adapter["1"].to_k_ip.weight.shape, adapter.scales
        (torch.Size([64, 32]), (1.0, 1.0))
        >>> sorted(adapter.xlabs_state_dict())[0]
        'double_blocks.0.processor.ip_adapter_double_stream_k_proj.bias'
    """

    reads_hidden_states = False  # XLabs' adapter reads the projected image embedding

    def __init__(self, image_proj: ImageProjection, num_layers: int, *, inner_dim: int) -> None:
        super().__init__()
        self.image_proj = image_proj
        joint = image_proj.norm.normalized_shape[0]
        self.ip_adapter = nn.ModuleDict({str(i): FluxIPAttentionLayer(joint, inner_dim) for i in range(num_layers)})
        self.scales: tuple[float, ...] = (1.0,) * num_layers

    @property
    def layers(self) -> list[FluxIPAttentionLayer]:
        """The per-block projections, double block 0 first."""
        return [layer for layer in self.ip_adapter.values() if isinstance(layer, FluxIPAttentionLayer)]

    @property
    def embed_dim(self) -> int:
        """The image embedding width it reads (the image encoder's ``projection_dim``)."""
        return self.image_proj.proj.in_features

    @property
    def joint_attention_dim(self) -> int:
        """The token width it makes: the transformer's T5 width."""
        return self.layers[0].to_k_ip.in_features

    @property
    def inner_dim(self) -> int:
        return self.layers[0].to_k_ip.out_features

    def set_scales(self, scales: float | Sequence[float]) -> None:
        """One scale for every double block, or one per block."""
        values = (float(scales),) * len(self.layers) if isinstance(scales, (int, float)) else tuple(float(s) for s in scales)
        if len(values) != len(self.layers):
            raise ValueError(f"the Flux IP-Adapter has {len(self.layers)} double blocks but {len(values)} scales were given")
        self.scales = values

    def project(self, features: Float[Tensor, "batch images embed"]) -> Float[Tensor, "batch tokens dim"]:
        """Image tokens from ``(batch, images, embed)`` image embeddings: each image projected, their tokens joined."""
        batch, images = features.shape[:2]
        param = self.image_proj.proj.weight
        tokens = self.image_proj(features.flatten(0, 1).to(device=param.device, dtype=param.dtype))
        return tokens.reshape(batch, images * tokens.shape[1], tokens.shape[2])

    def describe(self) -> str:
        return f"Flux, {len(self.layers)} double blocks, joint_attention_dim {self.joint_attention_dim}, width {self.inner_dim}"

    def mismatch(self, transformer: FluxTransformer2DModel) -> str | None:
        """Why this adapter cannot act on ``transformer`` (naming both), or None when it fits."""
        params = transformer.params
        theirs = (params.num_layers, params.joint_attention_dim, params.inner_dim)
        ours = (len(self.layers), self.joint_attention_dim, self.inner_dim)
        if ours == theirs:
            return None
        target = f"{theirs[0]} double blocks, joint_attention_dim {theirs[1]}, width {theirs[2]}"
        names = ("double blocks", "joint_attention_dim", "width")
        detail = ", ".join(f"{name} {a} vs {b}" for name, a, b in zip(names, ours, theirs, strict=True) if a != b)
        return _MSG_FIT.format(adapter=self.describe(), transformer=target, detail=detail)

    def keys_values(self, tokens: Float[Tensor, "batch tokens dim"]) -> list[list[ExtraKeysValues]]:
        """Each double block's image keys and values of ``tokens`` and its scale; a block at scale 0 gets none."""
        return [
            [(layer.to_k_ip(tokens), layer.to_v_ip(tokens), scale)] if scale != 0.0 else []
            for layer, scale in zip(self.layers, self.scales, strict=True)
        ]

    def xlabs_state_dict(self) -> dict[str, Tensor]:
        """The tensors under XLabs' names (the module's docstring), as ``ip_adapter.safetensors`` holds them."""
        tensors: dict[str, Tensor] = {}
        for key, tensor in self.state_dict().items():
            if key.startswith("image_proj."):
                tensors[XLABS_PROJECTION + key.removeprefix("image_proj.")] = tensor
            else:
                _, block, proj, param = key.split(".")
                tensors[f"{XLABS_LAYERS}{block}.processor.{_XLABS_NAMES[proj]}.{param}"] = tensor
        return tensors


@final
class MultiFluxIPAdapterModel(nn.Module):
    """Flux IP-Adapters that act together, each with its own image: their attentions are added, in order.

    Args:
        adapters: two or more Flux IP-Adapters for the same transformer.
    """

    def __init__(self, adapters: Iterable[FluxIPAdapterModel]) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(adapters)
        if len(self.adapters) < 2:
            raise ValueError(f"MultiFluxIPAdapterModel takes two or more IP-Adapters, got {len(self.adapters)}: give one as it is")
        for i, adapter in enumerate(self.adapters):
            if not isinstance(adapter, FluxIPAdapterModel):
                raise TypeError(f"MultiFluxIPAdapterModel takes FluxIPAdapterModels, but adapter {i} is a {type(adapter).__name__}")

    def __len__(self) -> int:
        return len(self.adapters)

    def __iter__(self) -> Iterator[FluxIPAdapterModel]:
        return (adapter for adapter in self.adapters if isinstance(adapter, FluxIPAdapterModel))


def flux_ip_adapters(component: FluxIPAdapterModel | MultiFluxIPAdapterModel) -> tuple[FluxIPAdapterModel, ...]:
    """The IP-Adapters of a Flux ``ip_adapter`` component, one or several, in order."""
    return (component,) if isinstance(component, FluxIPAdapterModel) else tuple(component)


def flux_image_prompt(
    component: FluxIPAdapterModel | MultiFluxIPAdapterModel, tokens: Sequence[Tensor]
) -> list[list[ExtraKeysValues]]:
    """What each double block's attention also attends to: every adapter's image keys and values, in adapter order.

    Args:
        component: the adapters.
        tokens: one ``(batch, tokens, dim)`` tensor of projected image tokens per adapter, in order.
    """
    adapters = flux_ip_adapters(component)
    if len(tokens) != len(adapters):
        raise ValueError(f"Conditioning.image_embeds has {len(tokens)} tensors but {len(adapters)} IP-Adapters are attached: give one per adapter")
    per_block: list[list[ExtraKeysValues]] = [[] for _ in adapters[0].layers]
    for adapter, image_tokens in zip(adapters, tokens, strict=True):
        for block, found in zip(per_block, adapter.keys_values(image_tokens), strict=True):
            block.extend(found)
    return per_block


FluxScale = float | Sequence[float]
"""One Flux IP-Adapter's scale: one for every double block, or a list of one per double block."""


def expand_flux_scales(scale: FluxScale | Sequence[FluxScale], *, num_layers: int, num_adapters: int) -> list[tuple[float, ...]]:
    """One scale per double block for each adapter, from diffusers' Flux ``set_ip_adapter_scale`` forms.

    A number sets every block of every adapter; with one adapter, a list of numbers is one per
    double block; with several, a list holds one entry (a number or such a list) per adapter.

    Raises:
        ValueError: a list of another length than the adapters, or than the double blocks, naming both.

    Example:
        >>> expand_flux_scales(0.5, num_layers=2, num_adapters=1)
        [(0.5, 0.5)]
        >>> expand_flux_scales([1.0, [0.0, 0.3]], num_layers=2, num_adapters=2)
        [(1.0, 1.0), (0.0, 0.3)]
    """
    if isinstance(scale, (int, float)):
        specs: list[FluxScale] = [float(scale)] * num_adapters
    elif num_adapters == 1 and all(isinstance(s, (int, float)) for s in scale):
        specs = [cast(Sequence[float], scale)]
    else:
        specs = list(cast(Sequence[FluxScale], scale))
    if len(specs) != num_adapters:
        raise ValueError(f"set_ip_adapter_scale got {len(specs)} scales for {num_adapters} IP-Adapters: give one for all, or one per adapter")
    expanded = []
    for i, spec in enumerate(specs):
        values = (float(spec),) * num_layers if isinstance(spec, (int, float)) else tuple(float(s) for s in spec)
        if len(values) != num_layers:
            raise ValueError(
                f"the scale of IP-Adapter {i} has {len(values)} values but the Flux transformer has {num_layers} double blocks: "
                "give one number, or one per double block"
            )
        expanded.append(values)
    return expanded


__all__ = [
    "FluxIPAdapterModel",
    "FluxIPAttentionLayer",
    "FluxScale",
    "MultiFluxIPAdapterModel",
    "expand_flux_scales",
    "flux_image_prompt",
    "flux_ip_adapters",
]
