"""Reading Flux IP-Adapter files (XLabs' layout, or diffusers' renaming of it), and telling them from the UNet ones."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from diffblocks.components.models.ip_adapter.flux import XLABS_LAYERS, XLABS_PROJECTION, FluxIPAdapterModel
from diffblocks.components.models.ip_adapter.loading import ip_adapter_from_state_dict, read_ip_adapter_file
from diffblocks.components.models.ip_adapter.model import IPAdapterModel
from diffblocks.components.models.ip_adapter.projection import ImageProjection

_MSG_LAYOUT = (
    "{path} is not a Flux IP-Adapter file: it needs 'ip_adapter_proj_model.proj.weight' and "
    "'double_blocks.N.processor.ip_adapter_double_stream_{{k,v}}_proj.{{weight,bias}}' (XLabs' layout) or "
    "'image_proj.*' and 'ip_adapter.N.to_{{k,v}}_ip.{{weight,bias}}' (diffusers'); {problem}"
)


def is_flux_ip_adapter(tensors: dict[str, Tensor]) -> bool:
    """Whether ``tensors`` are a Flux IP-Adapter's: XLabs' names, or keys and values with biases (the UNet's have none)."""
    return any(key.startswith((XLABS_PROJECTION, XLABS_LAYERS)) or key.endswith("to_k_ip.bias") for key in tensors)


def flux_ip_adapter_from_state_dict(tensors: dict[str, Tensor], *, source: str = "the state dict") -> FluxIPAdapterModel:
    """A :class:`FluxIPAdapterModel` holding ``tensors`` (XLabs' or diffusers' names), in their dtype.

    Raises:
        ValueError: another layout, or double blocks not numbered 0, 1, 2, ..., naming what was found.
    """
    ours: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        if key.startswith(XLABS_PROJECTION):
            key = "image_proj." + key.removeprefix(XLABS_PROJECTION)
        elif key.startswith(XLABS_LAYERS):  # double_blocks.N.processor.ip_adapter_double_stream_k_proj.weight
            parts = key.split(".")
            if len(parts) != 5:
                raise ValueError(_MSG_LAYOUT.format(path=source, problem=f"found {key!r}"))
            proj = parts[3].replace("ip_adapter_double_stream_k_proj", "to_k_ip").replace("ip_adapter_double_stream_v_proj", "to_v_ip")
            key = f"ip_adapter.{parts[1]}.{proj}.{parts[4]}"
        ours[key] = tensor
    other = sorted(key for key in ours if not key.startswith(("image_proj.", "ip_adapter.")))
    if "image_proj.proj.weight" not in ours or "image_proj.norm.weight" not in ours or other:
        problem = f"found other keys: {other[:6]}" if other else "found no plain image projection (proj, norm)"
        raise ValueError(_MSG_LAYOUT.format(path=source, problem=problem))
    numbers = sorted({int(key.split(".")[1]) for key in ours if key.startswith("ip_adapter.") and key.split(".")[1].isdigit()})
    if not numbers or numbers != list(range(len(numbers))):
        raise ValueError(_MSG_LAYOUT.format(path=source, problem=f"double blocks are numbered {numbers[:6]}, not 0, 1, 2, ..."))
    proj, norm = ours["image_proj.proj.weight"], ours["image_proj.norm.weight"]
    joint = norm.shape[0]
    image_proj = ImageProjection(proj.shape[1], joint, num_tokens=proj.shape[0] // joint)
    adapter = FluxIPAdapterModel(image_proj, len(numbers), inner_dim=ours["ip_adapter.0.to_k_ip.weight"].shape[0])
    adapter.to(dtype=proj.dtype).load_state_dict(ours, strict=True)
    return adapter.eval()


def any_ip_adapter_from_state_dict(tensors: dict[str, Tensor], *, source: str = "the state dict") -> IPAdapterModel | FluxIPAdapterModel:
    """The IP-Adapter ``tensors`` hold, for a UNet (SD 1.x/2.x, SDXL) or for Flux, told apart by their names."""
    if is_flux_ip_adapter(tensors):
        return flux_ip_adapter_from_state_dict(tensors, source=source)
    return ip_adapter_from_state_dict(tensors, source=source)


def load_any_ip_adapter_file(path: str | Path, *, allow_pickle: bool = False) -> IPAdapterModel | FluxIPAdapterModel:
    """The IP-Adapter in ``path``, a UNet's or a Flux transformer's (see :func:`any_ip_adapter_from_state_dict`)."""
    return any_ip_adapter_from_state_dict(read_ip_adapter_file(path, allow_pickle=allow_pickle), source=str(path))


__all__ = ["any_ip_adapter_from_state_dict", "flux_ip_adapter_from_state_dict", "is_flux_ip_adapter", "load_any_ip_adapter_file"]
