"""Random IP-Adapter FaceID and FaceID-Plus files in the released files' key layout, for a diffusers UNet folder."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from tests.ip_adapter.ip_files import ENCODER

ID_DIM = 512  # insightface's ArcFace embedding
RANK = 4
FaceKind = Literal["faceid", "faceid_plus"]


def attention_widths(unet_folder: Path) -> list[tuple[int, int, int]]:
    """``(query, source, inner)`` of every attention layer of a diffusers UNet, in its processor order."""
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(unet_folder)
    layers = [unet.get_submodule(name.removesuffix(".processor")) for name in unet.attn_processors]
    return [(layer.to_q.in_features, layer.to_k.in_features, layer.to_q.out_features) for layer in layers]


def faceid_tensors(
    widths: list[tuple[int, int, int]], kind: FaceKind, *, seed: int = 7, clip_dim: int = ENCODER["hidden_size"]
) -> dict[str, Tensor]:
    """The tensors of a FaceID (or FaceID-Plus) file: ``image_proj.*``, and per attention layer N the LoRA (and for N odd ``to_k_ip``, ``to_v_ip``)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.2) -> Tensor:
        return torch.randn(*shape, generator=generator) * std

    cross = widths[1][1]  # the first cross-attention layer's source width
    tensors = {"image_proj.proj.0.weight": rand(2 * ID_DIM, ID_DIM, std=0.05), "image_proj.proj.0.bias": rand(2 * ID_DIM),
               "image_proj.proj.2.weight": rand(4 * cross, 2 * ID_DIM, std=0.05), "image_proj.proj.2.bias": rand(4 * cross),
               "image_proj.norm.weight": 1 + rand(cross), "image_proj.norm.bias": rand(cross)}  # fmt: skip
    if kind == "faceid_plus":  # the original's FacePerceiverResampler: depth 4, heads of 64, feed-forward x4
        p = "image_proj.perceiver_resampler"
        tensors |= {f"{p}.proj_in.weight": rand(cross, clip_dim), f"{p}.proj_in.bias": rand(cross),
                    f"{p}.proj_out.weight": rand(cross, cross), f"{p}.proj_out.bias": rand(cross),
                    f"{p}.norm_out.weight": 1 + rand(cross), f"{p}.norm_out.bias": rand(cross)}  # fmt: skip
        for i in range(4):
            q = f"{p}.layers.{i}"
            tensors |= {f"{q}.0.norm1.weight": 1 + rand(cross), f"{q}.0.norm1.bias": rand(cross),
                        f"{q}.0.norm2.weight": 1 + rand(cross), f"{q}.0.norm2.bias": rand(cross),
                        f"{q}.0.to_q.weight": rand(64, cross), f"{q}.0.to_kv.weight": rand(128, cross),
                        f"{q}.0.to_out.weight": rand(cross, 64), f"{q}.1.0.weight": 1 + rand(cross),
                        f"{q}.1.0.bias": rand(cross), f"{q}.1.1.weight": rand(4 * cross, cross),
                        f"{q}.1.3.weight": rand(cross, 4 * cross)}  # fmt: skip
    for n, (query, source, inner) in enumerate(widths):
        for name, (a, b) in {"to_q_lora": (query, inner), "to_k_lora": (source, inner), "to_v_lora": (source, inner),
                             "to_out_lora": (inner, query)}.items():  # fmt: skip
            tensors[f"ip_adapter.{n}.{name}.down.weight"] = rand(RANK, a, std=0.1)
            tensors[f"ip_adapter.{n}.{name}.up.weight"] = rand(b, RANK, std=0.1)
        if n % 2:
            tensors[f"ip_adapter.{n}.to_k_ip.weight"] = rand(inner, source, std=0.5)
            tensors[f"ip_adapter.{n}.to_v_ip.weight"] = rand(inner, source, std=0.5)
    return tensors


def save_bin(tensors: dict[str, Tensor], path: Path) -> Path:
    """Save as the original ``.bin`` files are: ``{"image_proj": {...}, "ip_adapter": {...}}``, pickled."""
    nested: dict[str, dict[str, Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in tensors.items():
        part, _, rest = key.partition(".")
        nested[part][rest] = tensor
    torch.save(nested, path)
    return path


def face_embeds(images: int = 1, *, seed: int = 0) -> Tensor:
    """Random unit-length face embeddings, ``(images, 512)``, as insightface's ``normed_embedding`` are."""
    embeds = torch.randn(images, ID_DIM, generator=torch.Generator().manual_seed(seed))
    return embeds / embeds.norm(dim=-1, keepdim=True)
