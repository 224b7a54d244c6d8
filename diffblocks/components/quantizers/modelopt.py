"""NVIDIA ModelOpt: FP8, INT8, INT4, NF4 and NVFP4 weights, compressed in ModelOpt's own layers.

ModelOpt swaps each ``nn.Linear`` (and ``nn.Conv*``) for its ``QuantLinear``, calibrates the weight
quantizers with the "max" algorithm (each scale is the weight's largest magnitude, per tensor or
per block), then compresses (``mtq.compress``): the weight becomes the low-precision tensor itself
(``float8_e4m3fn``, ``int8``, packed ``uint8``), with its scales as ``weight_quantizer._scale``
buffers, and is dequantized when the layer runs.

The quant config is the one diffusers' ``NVIDIAModelOptConfig`` builds (``get_config_from_quant_type``,
diffusers 0.42), term for term, weight-only. It is built here rather than by diffusers because
diffusers 0.42 reads ``mtq.config._default_disabled_quantizer_cfg`` as a dict, and ModelOpt 0.47
made it a list (``TypeError: 'list' object is not a mapping``); ModelOpt still reads the dict form.

Saved weights are the compressed tensors and the quantizers' buffers, in safetensors, and the
``quantization_config`` diffusers writes. Loading rebuilds the layers from that config alone:
ModelOpt's ``modelopt_state.pth`` (a pickle) is neither written nor read.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, final

import torch
from pydantic import field_validator, model_validator
from torch import Tensor, nn
from typing_extensions import Self

from diffblocks.components.quantizers.base import AbstractQuantizer, UnsupportedQuantizationError, check_unexpected

ModelOptType = Literal["FP8", "INT8", "INT4", "NF4", "NVFP4"]

# diffusers' NVIDIAModelOptConfig.quanttype_to_numbits / quanttype_to_scalingbits
_NUM_BITS: dict[str, int | tuple[int, int]] = {"FP8": (4, 3), "INT8": 8, "INT4": 4, "NF4": 4, "NVFP4": (2, 1)}
_SCALE_BITS: dict[str, int | tuple[int, int]] = {"NF4": 8, "NVFP4": (4, 3)}
# 4-bit types are compressed only in blocks (ModelOpt: "Real quantization not supported for this format")
_NEEDS_BLOCKS = frozenset({"INT4", "NF4", "NVFP4"})
# ModelOpt's NF4 and NVFP4 kernels run on CUDA only; its NF4 dequantization fails on the CPU.
_NEEDS_CUDA = frozenset({"NF4", "NVFP4"})
_QUANTIZED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONVS = _QUANTIZED_LAYERS[1:]


def _json_keys(value: Any) -> Any:
    """``value`` with every mapping key a string, as JSON writes them.

    Block sizes mix axis keys (``-1``) with names (``"type"``), which ``json.dumps(sort_keys=True)``
    cannot order; JSON would turn the axes into strings anyway.
    """
    if isinstance(value, Mapping):
        return {str(k): _json_keys(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_keys(v) for v in value]
    return value


@final
class ModelOptQuantizer(AbstractQuantizer):
    """Quantize weights with NVIDIA ModelOpt (``pip install nvidia-modelopt``), as diffusers' ``NVIDIAModelOptConfig``.

    Args:
        quant_type: ``"FP8"`` (e4m3), ``"INT8"``, ``"INT4"``, ``"NF4"`` or ``"NVFP4"``, as diffusers
            names them (lower case accepted). Weights only: diffusers' ``"FP8_INT8"`` spellings
            (activations too) are refused.
        block_quantize: block size along ``channel_quantize`` (needed by INT4, NF4, NVFP4);
            without it FP8 and INT8 scale per tensor.
        channel_quantize: the axis the blocks run along (``-1``: along each row).
        scale_block_quantize, scale_channel_quantize: NF4 and NVFP4 quantize their block scales
            too, in blocks of this size along this axis.
        disable_conv_quantization: leave convolutions in full precision.

    Example:
        >>> ModelOptQuantizer("int8").quant_type
        'INT8'
        >>> ModelOptQuantizer("INT4", block_quantize=128, channel_quantize=-1).describe()
        "ModelOptQuantizer(quant_type='INT4', block_quantize=128, channel_quantize=-1)"
    """

    quant_method: ClassVar[str] = "modelopt"
    package: ClassVar[str] = "modelopt.torch.quantization"
    install: ClassVar[str] = 'pip install "diffblocks[quant]"  (or: pip install nvidia-modelopt)'

    quant_type: ModelOptType
    block_quantize: int | None = None
    channel_quantize: int | None = None
    scale_block_quantize: int | None = None
    scale_channel_quantize: int | None = None
    disable_conv_quantization: bool = False

    def __init__(self, quant_type: str | None = None, /, **data: Any) -> None:
        if quant_type is not None:
            data["quant_type"] = quant_type
        super().__init__(**data)

    @field_validator("quant_type", mode="before")
    @classmethod
    def _canonical(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        name = value.upper()
        if "_" in name:
            raise ValueError(
                f"ModelOptQuantizer quantizes weights only; {value!r} asks for activations too. "
                f"Use {name.split('_')[0]!r}."
            )
        if name not in _NUM_BITS:
            raise ValueError(f"unknown ModelOpt quant type {value!r}; known: {', '.join(_NUM_BITS)}")
        return name

    @model_validator(mode="after")
    def _blocks(self) -> Self:
        if self.quant_type in _NEEDS_BLOCKS and (self.block_quantize is None or self.channel_quantize is None):
            raise ValueError(
                f"ModelOptQuantizer({self.quant_type!r}) compresses weights in blocks: pass block_quantize and "
                f"channel_quantize (e.g. block_quantize=128, channel_quantize=-1)."
            )
        if (self.scale_block_quantize is None) != (self.scale_channel_quantize is None):
            raise ValueError("ModelOptQuantizer: pass scale_block_quantize and scale_channel_quantize together, or neither.")
        if self.scale_block_quantize is not None and self.block_quantize is None:
            raise ValueError("ModelOptQuantizer: scale_block_quantize needs block_quantize (the scales are the blocks').")
        return self

    def check_device(self, device: torch.device) -> None:
        if self.quant_type in _NEEDS_CUDA and device.type != "cuda":
            raise UnsupportedQuantizationError(
                f"{self.describe()} cannot run on {device}: ModelOpt's {self.quant_type} kernels need a CUDA GPU. "
                "Use FP8, INT8 or INT4 there, or load onto a GPU."
            )

    # --- the quant config, as diffusers builds it ----------------------------------------------------

    def skipped(self, model: nn.Module) -> list[str]:
        """The names diffusers disables: ``modules_to_not_convert``, then each conv parameter if asked."""
        names = list(self.modules_to_not_convert or ())
        if self.disable_conv_quantization:
            for name, module in model.named_modules():
                if isinstance(module, _CONVS):
                    names.extend(f"{name}.{param}" for param, _ in module.named_parameters(recurse=False))
        return names

    def modelopt_config(self, skipped: list[str] | None = None) -> dict[str, Any]:
        """The ``{"quant_cfg": ..., "algorithm": ...}`` ModelOpt applies (diffusers' ``modelopt_config``).

        Follows diffusers 0.42's ``NVIDIAModelOptConfig.get_config_from_quant_type`` with
        ``weight_only=True``, and its ``_process_model_before_weight_loading``, which disables
        ``*name*`` for each skipped name. ModelOpt's default exclusions (a list of entries since
        0.47) are written in the dict form diffusers expects.
        """
        mtq = self.require()
        defaults = mtq.config._default_disabled_quantizer_cfg
        disabled: dict[str, Any] = dict(defaults) if isinstance(defaults, Mapping) else {}  # a dict before 0.47
        for entry in [] if isinstance(defaults, Mapping) else defaults:
            cfg = {"enable": entry.get("enable", False)}
            if entry.get("parent_class"):
                disabled[entry["parent_class"]] = {entry["quantizer_name"]: cfg}
            else:
                disabled[entry["quantizer_name"]] = cfg
        off = {"enable": False}
        weight: dict[str, Any] = {"fake_quant": False, "num_bits": _NUM_BITS[self.quant_type]}
        inputs: dict[str, Any] = dict(off)  # weight-only; diffusers still records the block layout on it
        if self.block_quantize is not None and self.channel_quantize is not None:
            weight["block_sizes"] = {self.channel_quantize: self.block_quantize}
            inputs["block_sizes"] = {self.channel_quantize: self.block_quantize, "type": "dynamic"}
            if self.scale_block_quantize is not None and self.quant_type in _SCALE_BITS:
                weight["block_sizes"].update(
                    {"scale_bits": _SCALE_BITS[self.quant_type], "scale_block_sizes": {self.scale_channel_quantize: self.scale_block_quantize}}
                )
        elif self.channel_quantize is not None:
            weight["axis"] = self.channel_quantize
            inputs.update({"axis": self.channel_quantize, "type": "dynamic"})
        quant_cfg: dict[str, Any] = {
            "*weight_quantizer": weight,
            "*input_quantizer": inputs,
            "*output_quantizer": dict(off),
            "*q_bmm_quantizer": dict(off),
            "*k_bmm_quantizer": dict(off),
            "*v_bmm_quantizer": dict(off),
            "*softmax_quantizer": dict(off),
            **disabled,
        }
        for name in skipped or []:
            quant_cfg[f"*{name}*"] = dict(off)
        return {"quant_cfg": quant_cfg, "algorithm": {"method": "max"}}

    # --- applying --------------------------------------------------------------------------------------

    def _convert(self, model: nn.Module) -> list[str]:
        """Swap in ModelOpt's layers (uncalibrated); the names of layers whose weights it will compress."""
        from modelopt.torch.opt import apply_mode

        skipped = self.skipped(model)
        with warnings.catch_warnings():  # the dict form diffusers writes is "deprecated" in ModelOpt 0.47
            warnings.simplefilter("ignore", DeprecationWarning)
            apply_mode(model, mode=[("quantize", self.modelopt_config(skipped))])
        return [
            name for name, module in model.named_modules()
            if getattr(getattr(module, "weight_quantizer", None), "is_enabled", False)
        ]

    def apply(self, model: nn.Module) -> None:
        mtq = self.require()
        self._convert(model)
        mtq.calibrate(model, algorithm="max", forward_loop=None)  # weight-only: scales from the weights
        mtq.compress(model)

    def to_diffusers(self) -> dict[str, Any]:
        skipped = list(self.modules_to_not_convert) if self.modules_to_not_convert else None
        return {
            "quant_method": self.quant_method,
            "quant_type": self.quant_type,
            "modules_to_not_convert": skipped,
            "weight_only": True,
            "channel_quantize": self.channel_quantize,
            "block_quantize": self.block_quantize,
            "calib_cfg": {"method": "max"},
            "forward_loop": None,
            "scale_channel_quantize": self.scale_channel_quantize,
            "scale_block_quantize": self.scale_block_quantize,
            "modelopt_config": _json_keys(self.modelopt_config(skipped)),
            "disable_conv_quantization": self.disable_conv_quantization,
        }

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> Self:
        if config.get("weight_only", True) is False:
            raise ValueError(
                "this ModelOpt quantization_config quantizes activations too (weight_only: false), which "
                "ModelOptQuantizer does not; quantize the float weights with ModelOptQuantizer instead."
            )
        skipped = config.get("modules_to_not_convert")
        return cls(
            str(config.get("quant_type", "FP8")),
            block_quantize=config.get("block_quantize"),
            channel_quantize=config.get("channel_quantize"),
            scale_block_quantize=config.get("scale_block_quantize"),
            scale_channel_quantize=config.get("scale_channel_quantize"),
            disable_conv_quantization=bool(config.get("disable_conv_quantization", False)),
            modules_to_not_convert=tuple(skipped) if skipped else None,
        )

    # --- saving and loading --------------------------------------------------------------------------

    def state_to_save(self, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
        # a compressed weight is a QTensorWrapper parameter; its storage is the plain low-precision tensor
        return {name: tensor.detach().as_subclass(Tensor) for name, tensor in model.state_dict().items()}, {}

    def load_state(self, model: nn.Module, tensors: dict[str, Tensor], metadata: Mapping[str, str], device: torch.device) -> None:
        """Rebuild ModelOpt's compressed layers from the config, then assign the saved tensors into them.

        The layers to compress are materialised with placeholder weights (ModelOpt builds a
        compressed layer only by compressing one); the saved tensors then replace every part.
        """
        mtq = self.require()
        placeholders: set[str] = set()
        for name, module in model.named_modules():
            if isinstance(module, _QUANTIZED_LAYERS):
                for param, value in list(module.named_parameters(recurse=False)):
                    setattr(module, param, nn.Parameter(torch.ones(value.shape, device=device), requires_grad=False))
                    placeholders.add(f"{name}.{param}")
        converted = self._convert(model)
        mtq.calibrate(model, algorithm="max", forward_loop=None)
        mtq.compress(model)
        state = dict(tensors)
        filled: set[str] = set()
        for name, module in model.named_modules():
            weight = module._parameters.get("weight") if isinstance(module, _QUANTIZED_LAYERS) else None
            metadata_of = getattr(weight, "metadata", None)
            if metadata_of is not None and f"{name}.weight" in state:
                # a compressed weight keeps its wrapper (what dequantizes it); only the bytes are read.
                # Every layer kind is filled the same way (ModelOpt re-wraps on assignment for linears only).
                saved = state.pop(f"{name}.weight")
                if saved.shape != weight.shape or saved.dtype != weight.dtype:
                    raise ValueError(
                        f"the saved ModelOpt weight {name}.weight is {saved.dtype} {tuple(saved.shape)}; "
                        f"{self.describe()} makes {weight.dtype} {tuple(weight.shape)} there"
                    )
                module._parameters["weight"] = type(weight)(saved, metadata=metadata_of)
                filled.add(f"{name}.weight")
        result = model.load_state_dict(state, strict=False, assign=True)
        check_unexpected(model, result.unexpected_keys, self)
        missing = set(result.missing_keys) - filled
        unfilled = sorted(missing & placeholders) + sorted(
            k for k in missing if any(k.startswith(f"{name}.weight_quantizer.") for name in converted)
        )
        if unfilled:
            shown = ", ".join(unfilled[:10]) + (f" ... ({len(unfilled)} in all)" if len(unfilled) > 10 else "")
            raise ValueError(f"the saved ModelOpt weights do not fill {type(model).__name__}: {shown} missing")


__all__ = ["ModelOptQuantizer", "ModelOptType"]
