"""Reading IP-Adapter files: the original ``ip-adapter_*.safetensors`` / ``.bin`` layout, which diffusers reads too."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from diffblocks.components.models.ip_adapter.faceid import faceid_projection_from_state_dict
from diffblocks.components.models.ip_adapter.lora import LORA_PROJECTIONS, AttentionDims
from diffblocks.components.models.ip_adapter.model import IPAdapterModel
from diffblocks.components.models.ip_adapter.projection import projection_from_state_dict

_MSG_PICKLE = (
    "{path} is a pickled file: loading it can run code from the file. Pass allow_pickle=True only for a file "
    "from a source you trust, or use the .safetensors version"
)
_MSG_LAYOUT = (
    "{path} is not an IP-Adapter file: it needs 'image_proj.*' and 'ip_adapter.N.to_k_ip.weight' / "
    "'ip_adapter.N.to_v_ip.weight' tensors; {problem}"
)


def read_ip_adapter_file(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Tensor]:
    """The tensors of an IP-Adapter file, flat (``image_proj.proj.weight``, ``ip_adapter.1.to_k_ip.weight``, ...).

    ``.safetensors`` files are flat already; the original pickled ``.bin`` files nest
    ``{"image_proj": {...}, "ip_adapter": {...}}`` and are read only with ``allow_pickle``.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    if not allow_pickle:
        raise ValueError(_MSG_PICKLE.format(path=path))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    flat: dict[str, Tensor] = {}
    for key, value in loaded.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{name}": tensor for name, tensor in value.items()})
        else:
            flat[key] = value
    return flat


def ip_adapter_from_state_dict(tensors: dict[str, Tensor], *, source: str = "the state dict") -> IPAdapterModel:
    """An :class:`IPAdapterModel` holding ``tensors`` (flat, in the file's layout), in their dtype.

    A FaceID file's LoRA (``ip_adapter.N.to_q_lora.down.weight``, ... for every attention layer,
    N = 0, 1, 2, ...) is held by the adapter too.

    Raises:
        ValueError: keys of another layout, layers numbered other than 1, 3, 5, ... (0, 1, 2, ...
            for a LoRA), LoRA layers of several ranks, each naming what was found.
    """
    image_proj = {key.removeprefix("image_proj."): t for key, t in tensors.items() if key.startswith("image_proj.")}
    layers = {key.removeprefix("ip_adapter."): t for key, t in tensors.items() if key.startswith("ip_adapter.")}
    other = sorted(key for key in tensors if not key.startswith(("image_proj.", "ip_adapter.")))
    if not image_proj or not layers or other:
        problem = f"found other keys: {other[:6]}" if other else "found none of " + ("ip_adapter.*" if image_proj else "image_proj.*")
        raise ValueError(_MSG_LAYOUT.format(path=source, problem=problem))
    numbers = sorted({int(key.split(".")[0]) for key in layers if "_ip." in key})
    if numbers != list(range(1, 2 * len(numbers), 2)):
        raise ValueError(_MSG_LAYOUT.format(path=source, problem=f"layers are numbered {numbers[:6]}..., not 1, 3, 5, ..."))
    dims = [tuple(layers[f"{n}.to_k_ip.weight"].shape[::-1]) for n in numbers]
    lora_dims, rank = _lora_dims(layers, 2 * len(numbers), source)
    projection = faceid_projection_from_state_dict(image_proj) or projection_from_state_dict(image_proj)
    adapter = IPAdapterModel(projection, [(int(a), int(b)) for a, b in dims], lora_dims=lora_dims, lora_rank=rank)
    dtype = next(iter(tensors.values())).dtype
    adapter.to(dtype=dtype).load_state_dict(tensors, strict=True)
    return adapter.eval()


def _lora_dims(layers: dict[str, Tensor], count: int, source: str) -> tuple[list[AttentionDims], int]:
    """A FaceID file's LoRA: the widths of the ``count`` attention layers it updates, and its rank; none: ``([], 0)``."""
    numbers = sorted({int(key.split(".")[0]) for key in layers if "_lora." in key})
    if not numbers:
        return [], 0
    if numbers != list(range(count)):
        problem = f"its LoRA layers are numbered {numbers[:6]}..., but {count} attention layers (0 .. {count - 1}) need one each"
        raise ValueError(_MSG_LAYOUT.format(path=source, problem=problem))
    wanted = [f"{n}.{name}.{part}.weight" for n in numbers for name in LORA_PROJECTIONS for part in ("down", "up")]
    missing = [key for key in wanted if key not in layers]
    if missing:
        problem = f"its LoRA lacks ip_adapter.{missing[0]} ({len(missing)} tensors missing)"
        raise ValueError(_MSG_LAYOUT.format(path=source, problem=problem))
    ranks = sorted({layers[f"{n}.to_q_lora.down.weight"].shape[0] for n in numbers})
    if len(ranks) != 1:
        raise ValueError(_MSG_LAYOUT.format(path=source, problem=f"its LoRA layers have ranks {ranks}; one rank is read"))
    dims = []
    for n in numbers:
        query = layers[f"{n}.to_q_lora.down.weight"].shape[1]
        source_dim = layers[f"{n}.to_k_lora.down.weight"].shape[1]
        inner = layers[f"{n}.to_q_lora.up.weight"].shape[0]
        dims.append(AttentionDims(int(query), int(source_dim), int(inner)))
    return dims, int(ranks[0])


def load_ip_adapter_file(path: str | Path, *, allow_pickle: bool = False) -> IPAdapterModel:
    """The IP-Adapter in ``path`` (see :func:`read_ip_adapter_file` and :func:`ip_adapter_from_state_dict`)."""
    return ip_adapter_from_state_dict(read_ip_adapter_file(path, allow_pickle=allow_pickle), source=str(path))


__all__ = ["ip_adapter_from_state_dict", "load_ip_adapter_file", "read_ip_adapter_file"]
