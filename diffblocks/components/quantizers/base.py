"""The quantizer contract: a frozen config value per backend, one verb that applies it, one record of who did.

A quantizer is a settings value like a guider: comparable, hashable, JSON round-trippable, and it
holds no weights. :func:`quantize` checks that the backend's package is installed and that the
model's device can run the quant type, then replaces the model's linear weights in place. The
quantizer that was applied is remembered beside the model (:func:`quantizer_of`), so saving writes
diffusers' ``quantization_config`` and a second quantization of the same weights is refused: it
would quantize rounding errors, so a swap always starts from the original weights.

Every backend's package is imported only when a quantizer of that backend is used, and a missing
package fails by name with the install line, before any weight is read.
"""

from __future__ import annotations

import importlib
import weakref
from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import ModuleType
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn
from typing_extensions import Self

_MSG_NOT_INSTALLED = (
    "{quantizer} needs the Python package {package!r}, which is not installed (or failed to import: {err}). "
    "Install it with: {install}"
)
_MSG_TWICE = (
    "this {model} is already quantized with {done}; quantizing it again would quantize rounding errors. "
    "Quantize the original weights instead (a pipeline does: pipe.quantize(...) reloads them)."
)


class QuantizerNotInstalledError(ImportError):
    """A quantizer's backend package is missing; the message has the ``pip install`` line."""


class UnsupportedQuantizationError(ValueError):
    """The quant type cannot run on the device asked for (raised before any weight is loaded)."""


class AbstractQuantizer(BaseModel, ABC):
    """A quantization backend's settings: which weights become what, and how they are stored.

    Subclasses are final and set:
        quant_method: diffusers' ``quant_method`` in ``config.json``'s ``quantization_config``.
        package: the module imported to quantize (``"torchao"``).
        install: the command that installs it.

    Args:
        modules_to_not_convert: module names (or name prefixes) left in full precision, as in
            diffusers' configs (e.g. ``("proj_out",)``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    quant_method: ClassVar[str]
    package: ClassVar[str]
    install: ClassVar[str]
    quantizes_float_weights: ClassVar[bool] = True
    """False for backends whose weights only come quantized in their own files (GGUF)."""

    @property
    def runs_in_inference_mode(self) -> bool:
        """Whether the quantized layers run under ``torch.inference_mode`` (else a pipeline uses ``no_grad``)."""
        return True

    modules_to_not_convert: tuple[str, ...] | None = None

    # --- checks, before any weight is read ---------------------------------------------------------------

    def require(self) -> ModuleType:
        """The backend's package, imported now.

        Raises:
            QuantizerNotInstalledError: it is missing or fails to import (the message says how to install it).
        """
        try:
            return importlib.import_module(self.package)
        except ImportError as err:
            raise QuantizerNotInstalledError(
                _MSG_NOT_INSTALLED.format(quantizer=self.describe(), package=self.package, err=err, install=self.install)
            ) from err

    def check_device(self, device: torch.device) -> None:  # noqa: B027 - most quant types run everywhere
        """Raise :class:`UnsupportedQuantizationError` if ``device`` cannot run this quant type."""

    def check(self, device: torch.device | str | None = None) -> None:
        """Everything that can fail before loading: the package imports and ``device`` runs the type."""
        self.require()
        self.check_device(torch.device(device if device is not None else "cpu"))

    # --- applying ----------------------------------------------------------------------------------------

    @abstractmethod
    def apply(self, model: nn.Module) -> None:
        """Quantize ``model``'s weights in place (called by :func:`quantize`, after :meth:`check`)."""

    def converts(self, name: str) -> bool:
        """Whether the module called ``name`` (a dotted path in the model) is quantized."""
        skipped = self.modules_to_not_convert or ()
        return not any(name == s or name.startswith(s + ".") or name.endswith("." + s) for s in skipped)

    def describe(self) -> str:
        """``TorchAoQuantizer(quant_type='int8wo')``: the class and the fields that differ from defaults."""
        fields = ", ".join(f"{k}={v!r}" for k, v in self.model_dump(exclude_defaults=True).items())
        return f"{type(self).__name__}({fields})"

    # --- saving and loading in diffusers' layout ---------------------------------------------------------

    @abstractmethod
    def to_diffusers(self) -> dict[str, Any]:
        """The ``quantization_config`` diffusers writes into ``config.json`` for this backend and type."""

    @classmethod
    @abstractmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> Self:
        """The quantizer a diffusers ``quantization_config`` describes (the inverse of :meth:`to_diffusers`)."""

    def state_to_save(self, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Plain tensors and safetensors metadata that store ``model``'s quantized weights.

        The default is the state dict as it is (backends whose quantized weights are plain tensors).
        """
        return dict(model.state_dict()), {}

    def prepare_to_load(self, model: nn.Module) -> None:  # noqa: B027 - the default layout needs no change
        """Turn a meta-built ``model`` into the layout its saved quantized state dict fills."""

    def state_to_load(self, tensors: dict[str, Tensor], metadata: Mapping[str, str]) -> dict[str, Tensor]:
        """The state dict to assign into the prepared model, from tensors and metadata read from files."""
        return tensors

    def load_state(self, model: nn.Module, tensors: dict[str, Tensor], metadata: Mapping[str, str], device: torch.device) -> None:
        """Fill the meta-built ``model`` with saved quantized ``tensors`` (already on ``device``).

        The model's computed buffers are materialised afterwards by the caller.
        """
        self.prepare_to_load(model)
        result = model.load_state_dict(self.state_to_load(tensors, metadata), strict=False, assign=True)
        check_unexpected(model, result.unexpected_keys, self)

    # --- JSON -------------------------------------------------------------------------------------------

    def __str__(self) -> str:
        return self.describe()

    def to_config(self) -> dict[str, Any]:
        """JSON-ready settings with ``_class_name`` (what a modular index records)."""
        return {"_class_name": type(self).__name__, **self.model_dump(mode="json")}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        """Build from :meth:`to_config` output; on ``AbstractQuantizer`` the class is looked up by name.

        Raises:
            ValueError: unknown or mismatched ``_class_name``, unknown keys, or invalid values.
        """
        if cls is AbstractQuantizer:
            from diffblocks.components.quantizers.registry import quantizer_from_config

            return quantizer_from_config(config)  # pyright: ignore[reportReturnType]
        name = config.get("_class_name", cls.__name__)
        if name != cls.__name__:
            raise ValueError(f"The config is for {name!r}, not {cls.__name__!r}; load it with quantizer_from_config.")
        return cls.model_validate({k: v for k, v in config.items() if not k.startswith("_")})


def check_unexpected(model: nn.Module, unexpected: list[str], quantizer: AbstractQuantizer) -> None:
    """Raise ValueError naming saved tensors that ``model`` quantized with ``quantizer`` has no place for."""
    if unexpected:
        shown = ", ".join(unexpected[:10]) + (f" ... ({len(unexpected)} in all)" if len(unexpected) > 10 else "")
        raise ValueError(
            f"the saved weights hold tensors that {type(model).__name__} quantized with {quantizer.describe()} has "
            f"no place for: {shown}. Is the folder for a different model, or its config.json edited?"
        )


# Who quantized which module: kept beside the module (never as an attribute patched onto it), and
# forgotten with it.
_APPLIED: weakref.WeakKeyDictionary[nn.Module, AbstractQuantizer] = weakref.WeakKeyDictionary()


def quantizer_of(model: nn.Module) -> AbstractQuantizer | None:
    """The quantizer :func:`quantize` (or a quantized load) applied to ``model``, or None."""
    return _APPLIED.get(model)


def mark_quantized(model: nn.Module, quantizer: AbstractQuantizer) -> None:
    """Record that ``model`` holds ``quantizer``'s weights (loaders of saved quantized weights call this)."""
    _APPLIED[model] = quantizer


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first tensor (the CPU for a module without tensors)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def quantize(model: nn.Module, quantizer: AbstractQuantizer) -> nn.Module:
    """Quantize ``model`` in place with ``quantizer`` and return it.

    Raises:
        QuantizerNotInstalledError: the backend's package is missing (install line in the message).
        UnsupportedQuantizationError: the model's device cannot run the quant type.
        ValueError: the model is already quantized, or holds no weights.
    """
    done = quantizer_of(model)
    if done is not None:
        raise ValueError(_MSG_TWICE.format(model=type(model).__name__, done=done.describe()))
    if not any(True for _ in model.parameters()):
        raise ValueError(f"{type(model).__name__} holds no weights; there is nothing for {quantizer.describe()} to quantize.")
    quantizer.check(model_device(model))
    quantizer.apply(model)
    mark_quantized(model, quantizer)
    return model


__all__ = [
    "AbstractQuantizer",
    "QuantizerNotInstalledError",
    "UnsupportedQuantizationError",
    "mark_quantized",
    "model_device",
    "quantize",
    "quantizer_of",
]
