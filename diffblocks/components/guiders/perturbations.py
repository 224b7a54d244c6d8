"""Model perturbations for guidance: a worse model for one pass, seen only by the context that runs it.

A perturbation makes "a worse version of the model" for one forward pass (Ahn et al. 2024; Karras
et al. 2024). Targets are diffusers-style module paths (``mid_block.attentions.0``,
``transformer_blocks.3``). ``with perturbation.applied(model): predict(...)`` runs a perturbed
pass: what the perturbation does before and after the forwards of the targeted modules is read
from a context variable (:mod:`~diffblocks.components.guiders._seam`), so the pass is perturbed
and every other forward of the shared model, in any thread, is not. Only public hook APIs are
used; :func:`detach_perturbations` takes the (otherwise idle) dispatchers off the model.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from weakref import ReferenceType, WeakKeyDictionary, ref

import torch.nn.functional as F
from torch import Tensor, nn

from diffblocks.components.guiders._seam import PerturbationHooks, Scratch, activated, remove
from diffblocks.components.guiders.blur import blur_tokens, ids_grid, token_grid

_SELF_ATTENTION_NAMES = ("attn1", "attn")
_FEED_FORWARD_NAMES = ("ff", "ff_context")
_GRID = "grid"  # the scratch slot of the running forward's image grid (smoothed queries)

_MSG_NO_MODULE = (
    "{who}: {model} has no submodule {path!r}; {parent} has children {children}. "
    "Paths use diffusers module names, e.g. 'mid_block.attentions.0' or 'transformer_blocks.3'."
)
_MSG_NO_ATTENTION = (
    "{who}: {path!r} is not an attention module (no 'to_v'/'to_q') and holds no self-attention "
    "named {names}; point at an attention layer or at a block that contains one."
)


@dataclass(frozen=True)
class AbstractPerturbation(ABC):
    """A change to the forward of the submodules named by ``targets``, applied for one pass at a time.

    ``with perturbation.applied(model): ...`` perturbs the forwards of ``model`` made inside the
    block, in this thread or task only; no weight or module of the model changes, so other threads
    share it meanwhile. A perturbation is a value (compared by type and settings) that can be
    shared between models; what it does to a model is resolved once per model.

    Args:
        targets: module paths inside the model, such as ``"mid_block"`` or ``"transformer_blocks.1"``.
    """

    targets: tuple[str, ...]
    _resolved: WeakKeyDictionary[nn.Module, tuple[nn.Module, ...]] = field(
        default_factory=lambda: WeakKeyDictionary[nn.Module, tuple[nn.Module, ...]](),
        init=False,
        repr=False,
        compare=False,
    )
    _hooks: WeakKeyDictionary[nn.Module, PerturbationHooks] = field(
        default_factory=lambda: WeakKeyDictionary[nn.Module, PerturbationHooks](),
        init=False,
        repr=False,
        compare=False,
    )

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError(f"{type(self).__name__} needs at least one target module path, got none.")

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Perturb the forwards of ``model`` made inside the ``with`` block, in this thread or task only.

        The first pass on a model puts a dispatcher on each module the perturbation acts on; it
        stays, does nothing outside a perturbed pass (the output is bit-identical), and
        :func:`detach_perturbations` takes it off. Nested blocks: the innermost perturbation wins.

        Raises:
            ValueError: a target path does not name a suitable submodule.
        """
        hooks = self._hooks.get(model)
        if hooks is None:
            hooks = self._hooks[model] = self._build_hooks(model, self.resolve(model))
        with activated(hooks):
            yield

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

    @abstractmethod
    def _select(self, path: str, module: nn.Module) -> Iterator[nn.Module]:
        """The modules that target ``path`` (resolved to ``module``) stands for."""

    @abstractmethod
    def _build_hooks(self, model: nn.Module, modules: Sequence[nn.Module]) -> PerturbationHooks:
        """What a perturbed forward of ``model`` does before and after the forwards of ``modules`` (and others)."""


def detach_perturbations(model: nn.Module) -> None:
    """Take every perturbation's dispatchers off ``model``, leaving it exactly as before its first perturbed pass.

    Call it when no perturbed pass runs on ``model``; a later pass puts them back.
    """
    remove(model)


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

    def _build_hooks(self, model: nn.Module, modules: Sequence[nn.Module]) -> PerturbationHooks:
        hooks = PerturbationHooks()
        for attn in modules:
            out = attn.get_submodule("to_out.0") if hasattr(attn, "to_out") else None
            _route_values(hooks, attn, attn.get_submodule("to_v"), out)
            context_values, context_out = getattr(attn, "add_v_proj", None), getattr(attn, "to_add_out", None)
            if isinstance(context_values, nn.Module) and isinstance(context_out, nn.Module):
                _route_values(hooks, attn, context_values, context_out)
        return hooks


def _route_values(hooks: PerturbationHooks, owner: nn.Module, values: nn.Module, out_proj: nn.Module | None) -> None:
    """Feed the value projection's output to the out-projection (or out of ``owner``, if it has none)."""

    # the pass's scratch holds the values under their projection; popped when used so nothing lingers
    def keep(scratch: Scratch, _args: Any, _kwargs: Any, output: Tensor) -> None:
        scratch[values] = output

    def swap_input(scratch: Scratch, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        kept = scratch.pop(values, None)
        if isinstance(kept, Tensor) and kept.shape == args[0].shape:
            return (kept, *args[1:]), kwargs
        return None

    def swap_output(scratch: Scratch, _args: Any, _kwargs: Any, output: Any) -> Tensor | None:
        kept = scratch.pop(values, None)
        if isinstance(kept, Tensor) and isinstance(output, Tensor) and kept.shape == output.shape:
            return kept
        return None

    hooks.after[values] = keep
    if out_proj is not None:
        hooks.before[out_proj] = swap_input
    else:
        hooks.after[owner] = swap_output


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

    def _build_hooks(self, model: nn.Module, modules: Sequence[nn.Module]) -> PerturbationHooks:
        hooks = PerturbationHooks()
        if math.isclose(self.dropout, 1.0):
            hooks.after.update((block, self._skip) for block in modules)
            return hooks
        for block in modules:
            for name, layer in block.named_modules():
                if name.rpartition(".")[2] in _FEED_FORWARD_NAMES:
                    hooks.after[layer] = self._drop
            hooks.after[block] = self._drop
        return hooks

    def _drop(self, _scratch: Scratch, _args: Any, _kwargs: Any, output: Any) -> Any:
        if isinstance(output, Tensor):
            return F.dropout(output, p=self.dropout)
        return type(output)(F.dropout(o, p=self.dropout) if isinstance(o, Tensor) else o for o in output)

    @staticmethod
    def _skip(_scratch: Scratch, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blur_sigma <= 0:
            raise ValueError(f"SmoothedQueries blur_sigma must be positive, got {self.blur_sigma}.")

    def _select(self, path: str, module: nn.Module) -> Iterator[nn.Module]:
        return _self_attentions(self, path, module)

    def _build_hooks(self, model: nn.Module, modules: Sequence[nn.Module]) -> PerturbationHooks:
        # the grid of the last ``img_ids`` seen, kept for the model's passes: the same ids come back
        # every step, and reading them is a device sync
        from_ids: list[tuple[ReferenceType[Tensor], tuple[int, int]]] = []

        def record_grid(scratch: Scratch, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            image = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.ndim == 4), None)
            ids = kwargs.get("img_ids")
            if image is not None:
                scratch[_GRID] = (image.shape[-2], image.shape[-1])
            elif isinstance(ids, Tensor) and ids.ndim >= 2 and ids.shape[-1] >= 3:
                cached = from_ids[0] if from_ids else None  # read once: other threads may replace it
                if cached is None or cached[0]() is not ids:
                    cached = (ref(ids), ids_grid(ids))
                    from_ids[:] = [cached]
                scratch[_GRID] = cached[1]
            else:
                scratch.pop(_GRID, None)

        def blur(scratch: Scratch, _args: Any, _kwargs: Any, queries: Tensor) -> Tensor:
            tokens = token_grid(queries.shape[1], scratch.get(_GRID))
            return blur_tokens(queries, tokens, sigma=self.blur_sigma, threshold_inf=self.blur_threshold_inf)

        hooks = PerturbationHooks()
        hooks.before[model] = record_grid
        for attn in modules:
            hooks.after[attn.get_submodule("to_q")] = blur
        return hooks


__all__ = ["AbstractPerturbation", "IdentityAttention", "SkipBlocks", "SmoothedQueries", "detach_perturbations"]
