"""Compile a model with ``torch.compile`` in place: whole, or only the blocks it repeats (regional compilation).

A denoiser is a stack of a few block classes repeated many times (SD's UNet: ResNets and spatial
transformers; Flux: 19 double and 38 single blocks). Compiling each repeated block instead of the
whole network lets blocks of one class reuse one compiled graph (PyTorch inlines module parameters
as inputs), so compile time grows with the number of distinct blocks rather than the size of the
network: the recipe of PyTorch's "Reducing torch.compile cold start compilation time with regional
compilation" tutorial, and of diffusers' ``compile_repeated_blocks``. Each compiled region costs a
little per call (guards, wrappers), which small models on a CPU feel (``docs/benchmarks.md``).

Compilation is in place (``nn.Module.compile``): the model keeps its class, its state dict and its
identity, so the components manager, the plan's checks and saving see the same model, and every
pipeline that shares it runs it compiled.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from diffblocks.components.compiled import unwrap_compiled
from diffblocks.components.models.base import AbstractModel

DENOISER_NAMES = ("unet", "transformer")
"""The component names diffusers' layouts give the denoiser: what ``Pipeline.compile`` compiles by default."""

_MSG_NOT_REGIONAL = (
    "{cls} declares no repeated blocks to compile: regional compilation needs a diffblocks model "
    "(AbstractModel) whose repeated_blocks names them. Pass regional=False to compile the whole model."
)


def compile_model(model: nn.Module, *, regional: bool = True, **compile_kwargs: Any) -> nn.Module:
    """Compile ``model`` in place and return it.

    Args:
        model: the model (a ``torch.compile`` wrapper is looked through).
        regional: compile only the outermost instances of ``model.repeated_blocks``; False compiles
            the whole model as one graph (longer to compile, fewer graph boundaries).
        **compile_kwargs: passed to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ``fullgraph``, ...).

    Raises:
        ValueError: ``regional`` for a model that declares no repeated blocks.

    Example:
        >>> from diffblocks.components.models.unet import UNet2DConditionModel, UNet2DConditionParams
        >>> unet = UNet2DConditionModel(UNet2DConditionParams(block_out_channels=(32, 64), layers_per_block=1,
        ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=2))
        >>> compile_model(unet, backend="eager") is unet
        True
        >>> sorted({type(m).__name__ for m in unet.modules() if m._compiled_call_impl is not None})
        ['ResnetBlock2D', 'SpatialTransformer']
    """
    model = unwrap_compiled(model)
    if not regional:
        model.compile(**compile_kwargs)
        return model
    repeated = model.repeated_blocks if isinstance(model, AbstractModel) else ()
    if not repeated:
        raise ValueError(_MSG_NOT_REGIONAL.format(cls=type(model).__name__))
    for block in _outermost(model, repeated):
        block.compile(**compile_kwargs)
    return model


def _outermost(model: nn.Module, classes: tuple[type[nn.Module], ...]) -> list[nn.Module]:
    """Instances of ``classes`` inside ``model`` that no other instance contains (compiling one compiles its inside)."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, classes):
                found.append(child)
            else:
                visit(child)

    visit(model)
    return found


__all__ = ["DENOISER_NAMES", "compile_model"]
