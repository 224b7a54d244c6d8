"""Random IP-Adapter files in the original layout and a random CLIP image encoder, laid out as h94/IP-Adapter is."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import PIL.Image
import torch
from safetensors.torch import save_file
from torch import Tensor
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

SIZE = 32
Kind = Literal["plain", "plus", "full"]
ENCODER = dict(hidden_size=32, intermediate_size=37, projection_dim=16, num_hidden_layers=2, num_attention_heads=4,
               image_size=32, patch_size=8)  # fmt: skip


def image_encoder(folder: Path, *, seed: int = 2, **changes: int) -> Path:
    """A random CLIPVisionModelWithProjection saved to ``folder`` (32x32 images, 16 patches)."""
    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**{**ENCODER, **changes})).save_pretrained(folder)
    return folder


def cross_attention_widths(unet_folder: Path) -> list[tuple[int, int]]:
    """``(cross_attention_dim, width)`` of a diffusers UNet's cross-attention layers in its processor order."""
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(unet_folder)
    layers = [unet.get_submodule(name.removesuffix(".processor")) for name in unet.attn_processors if name.endswith("attn2.processor")]
    return [(layer.to_k.in_features, layer.to_k.out_features) for layer in layers]


def ip_adapter_tensors(widths: list[tuple[int, int]], kind: Kind, *, seed: int = 3, embed: int | None = None) -> dict[str, Tensor]:
    """Random tensors of an IP-Adapter file for cross-attention layers of ``widths``."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.2) -> Tensor:
        return torch.randn(*shape, generator=generator) * std

    cross = widths[0][0]
    tensors: dict[str, Tensor] = {}
    if kind == "plain":
        embed = embed or ENCODER["projection_dim"]
        tensors |= {"image_proj.proj.weight": rand(4 * cross, embed), "image_proj.proj.bias": rand(4 * cross),
                    "image_proj.norm.weight": 1 + rand(cross), "image_proj.norm.bias": rand(cross)}  # fmt: skip
    elif kind == "full":
        embed = embed or ENCODER["hidden_size"]
        tensors |= {"image_proj.proj.0.weight": rand(embed, embed), "image_proj.proj.0.bias": rand(embed),
                    "image_proj.proj.2.weight": rand(cross, embed), "image_proj.proj.2.bias": rand(cross),
                    "image_proj.proj.3.weight": 1 + rand(cross), "image_proj.proj.3.bias": rand(cross)}  # fmt: skip
    else:
        embed, hidden, queries = embed or ENCODER["hidden_size"], 64, 4
        tensors |= {"image_proj.latents": rand(1, queries, hidden), "image_proj.proj_in.weight": rand(hidden, embed),
                    "image_proj.proj_in.bias": rand(hidden), "image_proj.proj_out.weight": rand(cross, hidden),
                    "image_proj.proj_out.bias": rand(cross), "image_proj.norm_out.weight": 1 + rand(cross),
                    "image_proj.norm_out.bias": rand(cross)}  # fmt: skip
        for i in range(4):  # diffusers reads a depth of 4
            p = f"image_proj.layers.{i}"
            tensors |= {f"{p}.0.norm1.weight": 1 + rand(hidden), f"{p}.0.norm1.bias": rand(hidden),
                        f"{p}.0.norm2.weight": 1 + rand(hidden), f"{p}.0.norm2.bias": rand(hidden),
                        f"{p}.0.to_q.weight": rand(64, hidden), f"{p}.0.to_kv.weight": rand(128, hidden),
                        f"{p}.0.to_out.weight": rand(hidden, 64), f"{p}.1.0.weight": 1 + rand(hidden),
                        f"{p}.1.0.bias": rand(hidden), f"{p}.1.1.weight": rand(4 * hidden, hidden),
                        f"{p}.1.3.weight": rand(hidden, 4 * hidden)}  # fmt: skip
    for i, (c, width) in enumerate(widths):
        tensors[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = rand(width, c, std=0.5)
        tensors[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = rand(width, c, std=0.5)
    return tensors


def ip_adapter_repo(root: Path, unet_folder: Path, kinds: dict[str, Kind], *, subfolder: str = "models") -> Path:
    """A folder laid out like h94/IP-Adapter: ``models/<name>.safetensors`` per kind and ``models/image_encoder``."""
    widths = cross_attention_widths(unet_folder)
    for seed, (name, kind) in enumerate(kinds.items(), start=3):
        (root / subfolder).mkdir(parents=True, exist_ok=True)
        save_file(ip_adapter_tensors(widths, kind, seed=seed), root / subfolder / name)
    image_encoder(root / subfolder / "image_encoder")
    return root


def picture(seed: int = 0, size: int = SIZE) -> PIL.Image.Image:
    return PIL.Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8"))




def xlabs_tensors(num_layers: int, joint: int, inner: int, *, embed: int = 16, tokens: int = 4, seed: int = 3) -> dict[str, Tensor]:
    """Random tensors of a Flux IP-Adapter file in XLabs' layout (``XLabs-AI/flux-ip-adapter``'s ``ip_adapter.safetensors``)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.3) -> Tensor:
        return torch.randn(*shape, generator=generator) * std

    tensors = {"ip_adapter_proj_model.proj.weight": rand(tokens * joint, embed), "ip_adapter_proj_model.proj.bias": rand(tokens * joint),
               "ip_adapter_proj_model.norm.weight": 1 + rand(joint), "ip_adapter_proj_model.norm.bias": rand(joint)}  # fmt: skip
    for i in range(num_layers):
        for kv in "kv":
            prefix = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            tensors[f"{prefix}.weight"], tensors[f"{prefix}.bias"] = rand(inner, joint, std=0.5), rand(inner)
    return tensors


def xlabs_repo(root: Path, num_layers: int, joint: int, inner: int, *, seeds: tuple[int, ...] = (3,)) -> Path:
    """A folder laid out like XLabs-AI/flux-ip-adapter (``ip_adapter.safetensors``, then ``ip_adapter_<seed>.safetensors``)
    and a random CLIP image encoder in ``image_encoder`` beside (XLabs' repository has none: it reads openai's)."""
    root.mkdir(parents=True, exist_ok=True)
    for n, seed in enumerate(seeds):
        name = "ip_adapter.safetensors" if n == 0 else f"ip_adapter_{seed}.safetensors"
        save_file(xlabs_tensors(num_layers, joint, inner, seed=seed), root / name)
    image_encoder(root / "image_encoder")
    return root
