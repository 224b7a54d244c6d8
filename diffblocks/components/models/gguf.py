"""Read GGUF files into our models, weights kept in their quantized blocks (see :mod:`~diffblocks.components.quantizers.gguf`).

The ``gguf`` package parses the container. Files in diffusers' keys load as they are; Flux files in
the community (Black Forest Labs) layout are converted by the table in
:mod:`~diffblocks.components.models.gguf_layouts`, splitting fused tensors by rows so that they
stay quantized; UNet files in the original checkpoints' keys (LDM, SGM) by the single-file tables
(:mod:`~diffblocks.components.models.single_file`).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, final

import numpy as np
import torch
from torch import Tensor, nn

from diffblocks.components.models.buffers import materialize_computed_buffers, meta_tensor_names
from diffblocks.components.models.loading import CheckpointError
from diffblocks.components.quantizers.base import mark_quantized
from diffblocks.components.quantizers.gguf import GGUFLinear, GGUFQuantizer
from diffblocks.components.quantizers.gguf_kernels import BLOCK_TYPES, FLOAT_TYPES, dequantize
from diffblocks.components.models.gguf_layouts import Rule, Split, layout_rule

_LIST_LIMIT = 8
_FAMILY_OF_CLASS = {"FluxTransformer2DModel": "flux"}
_COMMUNITY_MARKERS = {"flux": ("double_blocks.", "single_blocks.", "img_in.")}  # keys only BFL's layout has

_MSG_CORRUPT = (
    "cannot read {path} as GGUF: {err}. The file is truncated or corrupt (an interrupted download?); "
    "delete it and download it again."
)
_MSG_UNKNOWN_TYPE = (
    "{path} holds a tensor of an unknown GGUF type ({err}): the file is corrupt, or newer than the installed "
    "gguf package (pip install -U gguf)."
)
_MSG_TYPE = (
    "tensor {name!r} in {path} is stored as GGUF type {type_name}, which diffblocks cannot dequantize; "
    "it reads {known}. Pick a file quantized to one of these."
)

@final
@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """One tensor of a GGUF file: its name, ggml type, logical shape (rows first) and stored data.

    ``data`` is ``uint8`` bytes of shape ``(*rows, bytes per row)`` for a block type, and the
    tensor itself for F32, F16 and BF16.
    """

    name: str
    type_name: str
    shape: tuple[int, ...]
    data: Tensor

    def rows(self, start: int, stop: int) -> GGUFTensor:
        """Rows ``[start, stop)`` of a 1-D or 2-D tensor; blocks lie within rows, so this stays quantized."""
        return GGUFTensor(self.name, self.type_name, (stop - start, *self.shape[1:]), self.data[start:stop])

    def to_float(self, dtype: torch.dtype) -> Tensor:
        return dequantize(self.data, self.type_name, self.shape, dtype)

    @property
    def quantized(self) -> bool:
        return self.type_name in BLOCK_TYPES


def read_gguf(path: str | os.PathLike[str]) -> dict[str, GGUFTensor]:
    """Every tensor of a ``.gguf`` file, read into memory (the file is not kept open).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is truncated or corrupt, or a tensor has a type that is unknown
            or that diffblocks cannot dequantize (the message names the tensor).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    gguf = GGUFQuantizer().require()
    try:
        reader = gguf.GGUFReader(str(path))
        raw = list(reader.tensors)
    except (ValueError, IndexError, KeyError, OSError, struct.error, TypeError) as err:
        if "GGMLQuantizationType" in str(err):
            raise CheckpointError(_MSG_UNKNOWN_TYPE.format(path=path, err=err)) from err
        raise CheckpointError(_MSG_CORRUPT.format(path=path, err=err)) from err
    known = ", ".join([*BLOCK_TYPES, *FLOAT_TYPES])
    tensors: dict[str, GGUFTensor] = {}
    for item in raw:
        type_name = item.tensor_type.name
        if type_name not in BLOCK_TYPES and type_name not in FLOAT_TYPES:
            raise CheckpointError(_MSG_TYPE.format(name=item.name, path=path, type_name=type_name, known=known))
        shape = tuple(int(n) for n in reversed(item.shape.tolist()))  # ggml lists the fastest axis first
        array = np.array(item.data)  # a copy: the reader's memory map is read-only and closes with it
        if type_name == "BF16":
            data = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).reshape(shape)
        elif type_name in FLOAT_TYPES:
            data = torch.from_numpy(array).reshape(shape)
        else:
            kind = BLOCK_TYPES[type_name]
            if shape[-1] % kind.block_size:
                raise CheckpointError(
                    f"tensor {item.name!r} in {path}: rows of {shape[-1]} weights are not whole {type_name} blocks "
                    f"of {kind.block_size}; the file is corrupt"
                )
            data = torch.from_numpy(array).reshape(*shape[:-1], shape[-1] // kind.block_size * kind.type_size)
        tensors[item.name] = GGUFTensor(item.name, type_name, shape, data)
    return tensors


M = TypeVar("M", bound=nn.Module)


def load_gguf(
    path: str | os.PathLike[str],
    model_cls: type[M],
    *,
    config: Mapping[str, Any],
    quantizer: GGUFQuantizer | None = None,
    device: torch.device | str | None = None,
) -> M:
    """Build ``model_cls`` from ``config`` and fill it from a GGUF file, keeping its weights quantized.

    Files in diffusers' key layout load as they are; Flux files in the community (BFL) layout are
    converted by the table in :mod:`~diffblocks.components.models.gguf_layouts`; SD 1.x/2.x and
    SDXL UNet files in the original keys (LDM, SGM; with or without ``model.diffusion_model.``) by
    the single-file tables. Only linear layers stay quantized; convolutions are dequantized on load.

    Args:
        path: the ``.gguf`` file.
        model_cls: one of our models (``FluxTransformer2DModel``, ``UNet2DConditionModel``).
        config: the model's diffusers ``config.json`` mapping (the file does not carry one).
        quantizer: the compute dtype (default ``GGUFQuantizer()``: bfloat16).
        device: where the weights go (default: CPU).

    Raises:
        QuantizerNotInstalledError: ``gguf`` is missing (before the file is opened).
        CheckpointError: the file is corrupt, a tensor's type is unknown, a tensor's shape does not
            fit the model (the message names the tensor), or tensors are missing or left over.
    """
    quantizer = quantizer or GGUFQuantizer()
    device = torch.device(device if device is not None else "cpu")
    quantizer.check(device)
    tensors = read_gguf(path)
    with torch.device("meta"):
        model = model_cls.from_config(config)  # type: ignore[attr-defined]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rule = _rule_for(model, tensors)
    if rule is None and not any(key in tensors for key in expected):  # no diffusers key: an original layout
        tensors = _from_single_file_layout(tensors, model, expected, where=Path(path))
    converted = _convert(tensors, expected, rule, where=Path(path), model=model_cls.__name__)
    assign_gguf_tensors(model, converted, quantizer, device)
    materialize_computed_buffers(model, device=device)
    check_filled(model, where=Path(path), model_name=model_cls.__name__)
    mark_quantized(model, quantizer)
    return model.eval()


def _rule_for(model: nn.Module, tensors: Mapping[str, GGUFTensor]) -> Rule | None:
    """The community layout's key rule when the file is in it, else None (diffusers' own keys)."""
    family = _FAMILY_OF_CLASS.get(getattr(model, "diffusers_class_name", type(model).__name__))
    if family is None or not any(name.startswith(_COMMUNITY_MARKERS[family]) for name in tensors):
        return None
    params = getattr(model, "params", None)
    return layout_rule(family, params.model_dump() if params is not None else {})


def _from_single_file_layout(
    tensors: Mapping[str, GGUFTensor], model: nn.Module, expected: Mapping[str, tuple[int, ...]], *, where: Path
) -> dict[str, GGUFTensor]:
    """The file's tensors under our keys, read through the single-file table of the layout its keys fit.

    SD 1.x/2.x and SDXL UNet files keep the original checkpoint's keys (LDM's, SGM's), with or
    without the ``model.diffusion_model.`` prefix. A tensor taken as it is, or a range of its rows,
    stays quantized; one the table reshapes, swaps or transposes is dequantized first (in LDM and
    SGM UNets none is). Tensors the table does not name are left for :func:`_convert` to report.

    Raises:
        CheckpointError: the keys fit no known layout (naming the closest and what it lacks).
    """
    from diffblocks.components.models.single_file.layout import find_part
    from diffblocks.components.models.single_file.loading import LAYOUTS, rules_for
    from diffblocks.components.models.single_file.rules import Rows, Take, converted

    class_name = getattr(model, "diffusers_class_name", type(model).__name__)
    shapes = {name: tensor.shape for name, tensor in tensors.items()}
    try:
        part, prefix = find_part(shapes, class_name, LAYOUTS, file=str(where))
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    params = getattr(model, "params", None)
    config = params.model_dump() if params is not None else {}
    out: dict[str, GGUFTensor] = {}
    used: set[str] = set()
    for key, rule in rules_for(part, list(expected), config).items():
        source = tensors.get(prefix + rule.key)
        if source is None:
            continue  # reported as missing
        used.add(source.name)
        # each keeps the file's name, so that an error names the tensor as the file has it
        if isinstance(rule, Take):
            out[key] = source
        elif isinstance(rule, Rows):
            out[key] = source.rows(rule.start, rule.stop)
        else:
            data = converted(rule, {rule.key: source.to_float(torch.float32)}, expected[key])
            out[key] = GGUFTensor(source.name, "F32", tuple(data.shape), data)
    out.update({name: tensor for name, tensor in tensors.items() if name not in used and name not in out})
    return out


def _convert(
    tensors: Mapping[str, GGUFTensor],
    expected: Mapping[str, tuple[int, ...]],
    rule: Rule | None,
    *,
    where: Path,
    model: str,
) -> dict[str, GGUFTensor]:
    out: dict[str, GGUFTensor] = {}
    unexpected: list[str] = []
    for name, tensor in tensors.items():
        target = rule(name) if rule is not None else name
        if target is None or (isinstance(target, str) and target not in expected):
            unexpected.append(name)
            continue
        if isinstance(target, str):
            check_shape(tensor, expected[target], target, where=where, model=model)
            out[target] = tensor
            continue
        out.update(_split(tensor, target, expected, where=where, model=model))
    check_placed([k for k in expected if k not in out], unexpected, where=where, model=model)
    return out


def _split(
    tensor: GGUFTensor, split: Split, expected: Mapping[str, tuple[int, ...]], *, where: Path, model: str
) -> dict[str, GGUFTensor]:
    missing = [t for t in split.targets if t not in expected]
    if missing:
        raise CheckpointError(f"tensor {tensor.name!r} in {where} maps to {missing[0]!r}, which {model} does not have")
    rows = [r if r >= 0 else expected[t][0] for r, t in zip(split.rows, split.targets)]
    want = (sum(rows), *expected[split.targets[0]][1:])
    if tensor.shape != want:
        raise CheckpointError(
            f"tensor {tensor.name!r} in {where} has shape {tensor.shape}, but {model} needs {want} "
            f"for {', '.join(split.targets)}; is the file for a different model size, or the config?"
        )
    if split.swap_halves:
        half = tensor.shape[0] // 2
        swapped = torch.cat([tensor.data[half:], tensor.data[:half]])
        tensor = GGUFTensor(tensor.name, tensor.type_name, tensor.shape, swapped)
    parts: dict[str, GGUFTensor] = {}
    start = 0
    for target, count in zip(split.targets, rows):
        parts[target] = tensor.rows(start, start + count)
        start += count
    return parts


def check_shape(tensor: GGUFTensor, want: tuple[int, ...], target: str, *, where: Path, model: str) -> None:
    """Raise CheckpointError naming ``tensor`` (and the key ``target`` it fills) unless its shape is ``want``."""
    if tensor.shape != want:
        into = "" if target == tensor.name else f" (for {target})"
        raise CheckpointError(
            f"tensor {tensor.name!r} in {where} has shape {tensor.shape}, but {model} needs {want}{into}; "
            "is the file for a different model size, or the config?"
        )


def check_placed(missing: Sequence[str], unexpected: Sequence[str], *, where: Path, model: str) -> None:
    """Raise one CheckpointError listing the keys ``model`` lacks and the file's tensors it has no place for, if any."""
    if missing or unexpected:
        problems = [
            f"missing tensors: {', '.join(missing[:_LIST_LIMIT])} ({len(missing)} in all)" if missing else "",
            f"tensors the model has no place for: {', '.join(unexpected[:_LIST_LIMIT])} ({len(unexpected)} in all)"
            if unexpected
            else "",
        ]
        detail = "\n  ".join(p for p in problems if p)
        raise CheckpointError(f"{where} does not fit {model} built from the config given:\n  {detail}")


def check_filled(model: nn.Module, *, where: Path, model_name: str) -> None:
    """Raise CheckpointError naming the tensors of ``model`` still on the meta device after loading ``where``."""
    left = meta_tensor_names(model)
    if left:
        raise CheckpointError(f"{model_name} has tensors that {where} does not fill: {', '.join(left[:_LIST_LIMIT])}")


def assign_gguf_tensors(model: nn.Module, tensors: Mapping[str, GGUFTensor], quantizer: GGUFQuantizer, device: torch.device) -> None:
    """Fill ``model`` (built on the meta device) with ``tensors`` under its keys, on ``device``.

    Each ``nn.Linear`` whose weight is stored in a block type, and that ``quantizer`` converts,
    becomes a :class:`~diffblocks.components.quantizers.GGUFLinear` holding the blocks; every other
    tensor is dequantized into the quantizer's compute dtype.
    """
    dtype = quantizer.dtype
    plain: dict[str, Tensor] = {}
    for name, module in list(model.named_modules()):
        weight = tensors.get(f"{name}.weight")
        if not isinstance(module, nn.Linear) or weight is None or not weight.quantized or not quantizer.converts(name):
            continue
        bias = tensors.get(f"{name}.bias")
        layer = GGUFLinear(
            module.in_features,
            module.out_features,
            type_name=weight.type_name,
            data=weight.data.to(device),
            bias=bias.to_float(dtype).to(device) if bias is not None else None,
            compute_dtype=dtype,
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    done = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, GGUFLinear) for p in ("weight", "bias")}
    for key, tensor in tensors.items():
        if key not in done:
            plain[key] = tensor.to_float(dtype).to(device)
    model.load_state_dict(plain, strict=False, assign=True)


__all__ = ["GGUFTensor", "assign_gguf_tensors", "check_filled", "check_placed", "check_shape", "load_gguf", "read_gguf"]
