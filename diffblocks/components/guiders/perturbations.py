"""Model perturbations for guidance: forward hooks on named submodules that inject and eject cleanly.

A perturbation makes "a worse version of the model" for one forward pass (Ahn et al. 2024; Karras
et al. 2024). Targets are diffusers-style module paths (``mid_block.attentions.0``,
``transformer_blocks.3``). Only public hook APIs are used (``register_forward_hook`` and
``register_forward_pre_hook``); ejecting removes every handle, so the model is exactly as before.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from weakref import ReferenceType, WeakKeyDictionary, ref

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from diffblocks.components.guiders.blur import blur_tokens, ids_grid, token_grid

Handles = list[RemovableHandle]
_SELF_ATTENTION_NAMES = ("attn1", "attn")
_FEED_FORWARD_NAMES = ("ff", "ff_context")

_MSG_NO_MODULE = (
    "{who}: {model} has no submodule {path!r}; {parent} has children {children}. "
    "Paths use diffusers module names, e.g. 'mid_block.attentions.0' or 'transformer_blocks.3'."
)
_MSG_INJECTED = (
    "{who} is already injected into this model; eject it first. If another thread is running a "
    "perturbed pass on the model: guided_prediction runs one perturbed pass per model at a time, so "
    "inject perturbations through it, or give each thread its own model."
)
_MSG_NO_ATTENTION = (
    "{who}: {path!r} is not an attention module (no 'to_v'/'to_q') and holds no self-attention "
    "named {names}; point at an attention layer or at a block that contains one."
)


@dataclass(frozen=True)
class AbstractPerturbation(ABC):
    """Forward hooks on the submodules named by ``targets``, added by ``inject`` and removed by ``eject``.

    A perturbation is a value (compared by type and settings) that can be shared between models;
    the handles it adds are kept per model, so ``eject(model)`` removes exactly what ``inject(model)``
    added.

    Args:
        targets: module paths inside the model, such as ``"mid_block"`` or ``"transformer_blocks.1"``.
    """

    targets: tuple[str, ...]
    _handles: WeakKeyDictionary[nn.Module, Handles] = field(
        default_factory=lambda: WeakKeyDictionary[nn.Module, Handles](), init=False, repr=False, compare=False
    )
    _resolved: WeakKeyDictionary[nn.Module, tuple[nn.Module, ...]] = field(
        default_factory=lambda: WeakKeyDictionary[nn.Module, tuple[nn.Module, ...]](),
        init=False,
        repr=False,
        compare=False,
    )

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError(f"{type(self).__name__} needs at least one target module path, got none.")

    def inject(self, model: nn.Module) -> None:
        """Add this perturbation's hooks to ``model``.

        Raises:
            ValueError: a target path does not name a suitable submodule.
            RuntimeError: the perturbation is already injected into ``model``.
        """
        if model in self._handles:
            raise RuntimeError(_MSG_INJECTED.format(who=type(self).__name__))
        modules = self.resolve(model)
        handles: Handles = []
        try:
            self._attach(model, modules, handles)
        except BaseException:
            _remove(handles)
            raise
        self._handles[model] = handles

    def resolve(self, model: nn.Module) -> tuple[nn.Module, ...]:
        """The submodules of ``model`` the targets stand for (looked up once per model).

        Raises:
            ValueError: a target path does not name a suitable submodule.
        """
        modules = self._resolved.get(model)
        if modules is None:
            modules = tuple(m for path in self.targets for m in self._select(path, _submodule(self, model, path)))
            self._resolved[model] = modules
        return modules

    def eject(self, model: nn.Module) -> None:
        """Remove every hook that :meth:`inject` added to ``model``.

        Raises:
            RuntimeError: the perturbation is not injected into ``model``.
        """
        handles = self._handles.pop(model, None)
        if handles is None:
            raise RuntimeError(f"{type(self).__name__} is not injected into this model.")
        _remove(handles)

    @abstractmethod
    def _select(self, path: str, module: nn.Module) -> Iterator[nn.Module]:
        """The modules that target ``path`` (resolved to ``module``) stands for."""

    @abstractmethod
    def _attach(self, model: nn.Module, modules: Sequence[nn.Module], handles: Handles) -> None:
        """Register the hooks on ``modules`` and append their handles."""


def _remove(handles: Handles) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _submodule(who: AbstractPerturbation, model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        walked: list[str] = []
        found = model
        for name in path.split("."):
            child = dict(found.named_children()).get(name)
            if child is None:
                break
            walked.append(name)
            found = child
        parent = repr(".".join(walked)) if walked else "the model"
        names = [name for name, _ in found.named_children()]
        children = names if len(names) <= 12 else [*names[:5], "...", *names[-3:]]
        message = _MSG_NO_MODULE.format(
            who=type(who).__name__, model=type(model).__name__, path=path, parent=parent, children=children
        )
        raise ValueError(message) from err


def _self_attentions(who: AbstractPerturbation, path: str, module: nn.Module) -> Iterator[nn.Module]:
    """``module`` itself when it is an attention layer, else the self-attentions inside it."""
    if hasattr(module, "to_v") and hasattr(module, "to_q"):
        yield module
        return
    found = [m for name, m in module.named_modules() if name.rpartition(".")[2] in _SELF_ATTENTION_NAMES]
    if not found:
        raise ValueError(_MSG_NO_ATTENTION.format(who=type(who).__name__, path=path, names=_SELF_ATTENTION_NAMES))
    yield from found


@dataclass(frozen=True)
class IdentityAttention(AbstractPerturbation):
    """Perturbed-attention guidance (Ahn et al. 2024): the self-attention map becomes the identity.

    Each token then attends only to itself, so the attention output equals the values; the layer
    returns the out-projection of ``to_v(x)`` (and of ``add_v_proj(context)`` in joint attention).
    A cross-attention, whose values have another length than its queries, is left unchanged.
    """

    def _select(self, path: str, module: nn.Module) -> Iterator[nn.Module]:
        return _self_attentions(self, path, module)

    def _attach(self, model: nn.Module, modules: Sequence[nn.Module], handles: Handles) -> None:
        for attn in modules:
            out = attn.get_submodule("to_out.0") if hasattr(attn, "to_out") else None
            _route_values(attn, attn.get_submodule("to_v"), out, handles)
            context_values, context_out = getattr(attn, "add_v_proj", None), getattr(attn, "to_add_out", None)
            if isinstance(context_values, nn.Module) and isinstance(context_out, nn.Module):
                _route_values(attn, context_values, context_out, handles)


def _route_values(owner: nn.Module, values: nn.Module, out_proj: nn.Module | None, handles: Handles) -> None:
    """Feed the value projection's output to the out-projection (or out of ``owner``, if it has none)."""
    kept: list[Tensor] = []  # the values of the running forward; popped when used so nothing lingers

    def keep(_module: nn.Module, _args: Any, output: Tensor) -> None:
        kept[:] = [output]

    def swap_input(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if kept and kept[0].shape == args[0].shape:
            return (kept.pop(), *args[1:])
        return None

    def swap_output(_module: nn.Module, _args: Any, output: Any) -> Tensor | None:
        if kept and isinstance(output, Tensor) and kept[0].shape == output.shape:
            return kept.pop()
        return None

    handles.append(values.register_forward_hook(keep))
    if out_proj is not None:
        handles.append(out_proj.register_forward_pre_hook(swap_input))
    else:
        handles.append(owner.register_forward_hook(swap_output))


@dataclass(frozen=True)
class SkipBlocks(AbstractPerturbation):
    """Skip-layer guidance: each target block returns its input (``dropout=1``), or a dropped-out output.

    With ``0 < dropout < 1`` the outputs of the block and of its feed-forward layers (``ff``,
    ``ff_context``) go through ``F.dropout`` (random, rescaled by ``1/(1-p)``): this is how diffusers
    emulates the weak model of auto-guidance (Karras et al. 2024), and the same seed gives the same
    result. A target that is a ``ModuleList`` stands for all of its blocks.

    Args:
        targets: block paths (``"transformer_blocks.7"``) or block lists
            (``"mid_block.attentions.0.transformer_blocks"``).
        dropout: 1.0 skips the blocks; a smaller value drops that fraction of their outputs.
    """

    dropout: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.dropout <= 1.0:
            raise ValueError(f"SkipBlocks dropout must be in (0, 1], got {self.dropout}.")

    def _select(self, path: str, module: nn.Module) -> Iterator[nn.Module]:
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            yield from module
        else:
            yield module

    def _attach(self, model: nn.Module, modules: Sequence[nn.Module], handles: Handles) -> None:
        if math.isclose(self.dropout, 1.0):
            handles.extend(block.register_forward_hook(self._skip, with_kwargs=True) for block in modules)
            return
        for block in modules:
            for name, layer in block.named_modules():
                if name.rpartition(".")[2] in _FEED_FORWARD_NAMES:
                    handles.append(layer.register_forward_hook(self._drop, with_kwargs=True))
            handles.append(block.register_forward_hook(self._drop, with_kwargs=True))

    def _drop(self, _module: nn.Module, _args: Any, _kwargs: Any, output: Any) -> Any:
        if isinstance(output, Tensor):
            return F.dropout(output, p=self.dropout)
        return type(output)(F.dropout(o, p=self.dropout) if isinstance(o, Tensor) else o for o in output)

    @staticmethod
    def _skip(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(output, Tensor):
            return hidden
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        inputs = [t for t in (hidden, context) if isinstance(t, Tensor)]
        skipped = []
        for position, out in enumerate(output):
            same = [t for t in inputs if isinstance(out, Tensor) and t.shape == out.shape]
            if len(same) == 2:
                # Equal shapes cannot tell the streams apart: diffusers' dual-stream blocks return
                # (encoder_hidden_states, hidden_states), in that order.
                same = [context if position == 0 else hidden]
            skipped.append(same[0] if same else out)
        return type(output)(skipped)


@dataclass(frozen=True)
class SmoothedQueries(AbstractPerturbation):
    """Smoothed-energy guidance (Hong 2024): self-attention queries blurred over the image grid.

    Blurring the queries blurs the attention energy ``QK^T`` (it is linear in Q). A Gaussian of
    ``blur_sigma`` (in tokens) is used, or the global mean of the queries when ``blur_sigma`` exceeds
    ``blur_threshold_inf`` (the paper's infinite blur). The token grid comes from the model input:
    a 4-D input's height and width (UNets), else the rows and columns of the ``img_ids`` keyword
    (Flux's packed tokens), else the tokens must form a square.

    Args:
        targets: attention layers, or blocks containing self-attention (``"mid_block"``).
        blur_sigma: Gaussian standard deviation in tokens.
        blur_threshold_inf: ``blur_sigma`` above this means infinite blur.
    """

    blur_sigma: float = 9999999.0
    blur_threshold_inf: float = 9999.0
    # the grid of the last ``img_ids`` seen: kept across inject/eject, since the same ids come back
    # every step and reading them is a device sync
    _ids_grid: list[tuple[ReferenceType[Tensor], tuple[int, int]]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blur_sigma <= 0:
            raise ValueError(f"SmoothedQueries blur_sigma must be positive, got {self.blur_sigma}.")

    def _select(self, path: str, module: nn.Module) -> Iterator[nn.Module]:
        return _self_attentions(self, path, module)

    def _attach(self, model: nn.Module, modules: Sequence[nn.Module], handles: Handles) -> None:
        grid: list[tuple[int, int]] = []  # the image grid of the running forward
        from_ids = self._ids_grid

        def record_grid(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            image = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.ndim == 4), None)
            ids = kwargs.get("img_ids")
            if image is not None:
                grid[:] = [(image.shape[-2], image.shape[-1])]
            elif isinstance(ids, Tensor) and ids.ndim >= 2 and ids.shape[-1] >= 3:
                if not from_ids or from_ids[0][0]() is not ids:
                    from_ids[:] = [(ref(ids), ids_grid(ids))]
                grid[:] = [from_ids[0][1]]
            else:
                grid.clear()

        def blur(_module: nn.Module, _args: Any, queries: Tensor) -> Tensor:
            tokens = token_grid(queries.shape[1], grid[0] if grid else None)
            return blur_tokens(queries, tokens, sigma=self.blur_sigma, threshold_inf=self.blur_threshold_inf)

        handles.append(model.register_forward_pre_hook(record_grid, with_kwargs=True))
        for attn in modules:
            handles.append(attn.get_submodule("to_q").register_forward_hook(blur))


__all__ = ["AbstractPerturbation", "IdentityAttention", "SkipBlocks", "SmoothedQueries"]
