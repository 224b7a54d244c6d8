"""The diffusers-style LoRA methods of a pipeline, on top of :mod:`diffblocks.components.lora`.

``load_lora_weights`` reads a LoRA file for the pipeline's denoiser (``unet`` or ``transformer``)
and attaches it; the other methods set weights, fuse, unfuse and remove. As in diffusers, the
adapter just loaded is the active one (the others stay attached at weight 0) until
``set_adapters`` names several. The adapters live in the denoiser module, so every pipeline that
shares it (through a :class:`ComponentsManager`) sees them.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from torch import nn

from diffblocks.components.compiled import unwrap_compiled
from diffblocks.components.lora import LoRA, LoRALayer, eject, fuse, inject, set_weights, unfuse
from diffblocks.components.lora import adapter_names as attached_names
from diffblocks.components.lora import hotswap as hot_swap
from diffblocks.components.lora.sources import DEFAULT_WEIGHT_NAME, resolve_lora_file
from diffblocks.components.models.compile import DENOISER_NAMES


class AbstractLoRAMethods(ABC):
    """``load_lora_weights``, ``set_adapters``, ``fuse_lora``, ``unfuse_lora``, ``delete_adapters``, ``unload_lora_weights``."""

    @property
    @abstractmethod
    def components(self) -> dict[str, Any]: ...

    _lora_target_rank: int | None = None  # set by enable_lora_hotswap: adapters loaded after it are padded to it

    def enable_lora_hotswap(self, target_rank: int) -> None:
        """Pad the adapters loaded from now on to ``target_rank``, so that any LoRA of rank up to it hot-swaps in.

        A hot-swap copies tensors in place, so their shapes cannot change; padding with zeros (the
        same update) leaves room for a higher rank, as diffusers' ``enable_lora_hotswap`` does.
        Call it before the first :meth:`load_lora_weights` and before compiling the denoiser.

        Raises:
            ValueError: ``target_rank`` is below 1.
        """
        if target_rank < 1:
            raise ValueError(f"enable_lora_hotswap needs a target_rank of at least 1, got {target_rank}")
        self._lora_target_rank = target_rank

    def disable_lora_hotswap(self) -> None:
        """Load adapters at their own ranks again (the attached ones keep theirs)."""
        self._lora_target_rank = None

    def load_lora_weights(
        self,
        path_or_repo: str | os.PathLike[str],
        weight_name: str | None = None,
        adapter_name: str | None = None,
        *,
        allow_pickle: bool = False,
        hotswap: bool = False,
        revision: str | None = None,
    ) -> str:
        """Attach a LoRA file (diffusers/PEFT or kohya layout) to the denoiser and make it the active adapter.

        Args:
            path_or_repo: a LoRA file, a folder, or a Hub repository id.
            weight_name: the file inside the folder or repository; default ``pytorch_lora_weights.safetensors``.
            adapter_name: the adapter's name; default ``default_0``, ``default_1``, ... as in diffusers.
            allow_pickle: accept a pickled ``.bin``; only for files from a source you trust.
            hotswap: put the file's weights into the attached adapter ``adapter_name`` in place (same
                layers, ranks up to the attached one's), so that a compiled denoiser does not recompile; its weight stays.
            revision: a Hub branch, tag or commit. The adapter records the commit read and the file's
                sha256, which :meth:`save_pretrained` writes into the preset.

        Returns:
            The adapter name.

        Raises:
            ValueError: unknown keys (named), a layer of another shape (named, with both shapes), a
                pickle without ``allow_pickle``, a name already attached; nothing changes.
        """
        model = self._lora_model()
        path, source = resolve_lora_file(path_or_repo, weight_name, revision=revision)
        attached = attached_names(model)
        if hotswap:
            if adapter_name is None:
                raise ValueError(f"hotswap=True replaces an attached adapter: name it with adapter_name (attached: {attached})")
            hot_swap(model, adapter_name, LoRA.from_file(path, model, name=adapter_name, allow_pickle=allow_pickle, source=source))
            return adapter_name
        name = adapter_name or next(f"default_{i}" for i in range(len(attached) + 1) if f"default_{i}" not in attached)
        lora = LoRA.from_file(path, model, name=name, allow_pickle=allow_pickle, source=source)
        inject(model, lora if self._lora_target_rank is None else lora.padded(self._lora_target_rank))
        set_weights(model, {name: 1.0})
        return name

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights: float | Sequence[float] | None = None) -> None:
        """Make the named adapters active at their weights (default 1.0); the others get weight 0."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None or isinstance(adapter_weights, (int, float)):
            weights = [1.0 if adapter_weights is None else float(adapter_weights)] * len(names)
        else:
            weights = [float(w) for w in adapter_weights]
        if len(weights) != len(names):
            raise ValueError(f"set_adapters got {len(names)} adapter names but {len(weights)} weights")
        set_weights(self._lora_model(), dict(zip(names, weights, strict=True)))

    def get_active_adapters(self) -> list[str]:
        """The attached adapters with a weight other than 0."""
        active: dict[str, None] = {}
        for module in self._lora_model().modules():
            if isinstance(module, LoRALayer):
                active.update(dict.fromkeys(n for n, w in module.weights.items() if w != 0.0))
        return list(active)

    def fuse_lora(self) -> None:
        """Add the active adapters, at their weights, into the denoiser's weights (faster steps)."""
        fuse(self._lora_model())

    def unfuse_lora(self) -> None:
        """Restore the denoiser's weights as they were before :meth:`fuse_lora`, bit for bit."""
        unfuse(self._lora_model())

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Remove the named adapters; layers left without one get their original module back."""
        model = self._lora_model()
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            eject(model, name)

    def unload_lora_weights(self) -> None:
        """Unfuse and remove every adapter: the denoiser is its original self again."""
        model = self._lora_model()
        for name in attached_names(model):
            eject(model, name)

    def _lora_model(self) -> nn.Module:
        components = self.components
        found = [unwrap_compiled(components[n]) for n in DENOISER_NAMES if n in components]
        if not found or not isinstance(found[0], nn.Module):
            raise ValueError(f"LoRA attaches to a pipeline's {' or '.join(DENOISER_NAMES)}; this pipeline has neither")
        return found[0]


__all__ = ["DEFAULT_WEIGHT_NAME", "AbstractLoRAMethods"]
