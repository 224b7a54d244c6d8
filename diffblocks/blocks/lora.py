"""The diffusers-style LoRA methods of a pipeline, on top of :mod:`diffblocks.components.lora`.

``load_lora_weights`` reads a LoRA file for the pipeline's denoiser (``unet`` or ``transformer``)
and its text encoders (``text_encoder``, ``text_encoder_2``), gives each model its own keys, and
attaches the adapter to all of them under one name; the other methods set weights, fuse, unfuse
and remove, on every model that holds the adapter. As in diffusers, the adapter just loaded is
the active one (the others stay attached at weight 0) until ``set_adapters`` names several. The
adapters live in the modules, so every pipeline that shares them (through a
:class:`ComponentsManager`) sees them.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from diffblocks.components.compiled import unwrap_compiled
from diffblocks.components.lora import LoRA, LoRALayer, eject, fuse, inject, read_lora_file, set_weights, unfuse
from diffblocks.components.lora import adapter_names as attached_names
from diffblocks.components.lora import hotswap as hot_swap
from diffblocks.components.lora import check_hotswappable, check_injectable, set_enabled
from diffblocks.components.lora.sources import DEFAULT_WEIGHT_NAME, LoRASource, resolve_lora_file
from diffblocks.components.lora.text_encoders import DENOISER, prefixes_of, split_by_model
from diffblocks.components.models.compile import DENOISER_NAMES

TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")
"""The component names of the text encoders a LoRA file may update."""

_MSG_NO_MODEL = (
    "{count} key(s) of this LoRA file are for {component}, which this pipeline has none of (e.g. {key}); "
    "the file is for another family; nothing was loaded"
)


class AbstractLoRAMethods(ABC):
    """diffusers' LoRA methods: load, set adapters, enable and disable, fuse and unfuse, delete and unload."""

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
        """Attach a LoRA file (diffusers/PEFT or kohya layout) to the denoiser and text encoders; make it the active adapter.

        The file's keys are sorted by model (:mod:`diffblocks.components.lora.text_encoders`), each
        part is read for its model, and every model is checked before any is changed.

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
            ValueError: unknown keys (named), keys for a text encoder the pipeline lacks, a layer of
                another shape (named, with both shapes), a pickle without ``allow_pickle``, a name
                already attached; nothing changes.
        """
        models = self._lora_models()
        path, source = resolve_lora_file(path_or_repo, weight_name, revision=revision)
        attached = self._attached()
        if hotswap and adapter_name is None:
            raise ValueError(f"hotswap=True replaces an attached adapter: name it with adapter_name (attached: {attached})")
        name = adapter_name or next(f"default_{i}" for i in range(len(attached) + 1) if f"default_{i}" not in attached)
        loras = lora_parts(read_lora_file(path, allow_pickle=allow_pickle), models, name, source)
        if hotswap:
            holding = sorted(c for c, model in models.items() if name in attached_names(model))
            if holding and sorted(loras) != holding:
                raise ValueError(
                    f"LoRA {name!r} cannot be replaced in place: it is attached to {holding}, the new file updates {sorted(loras)}"
                )
            for component, lora in loras.items():  # every model checked before any changes
                check_hotswappable(models[component], name, lora)
            for component, lora in loras.items():
                hot_swap(models[component], name, lora)
            return name
        if name in attached:
            raise ValueError(f"a LoRA named {name!r} is already attached to this pipeline; delete it first or pick another name")
        if self._lora_target_rank is not None:  # room for a later hot-swap of a higher rank
            loras = {component: lora.padded(self._lora_target_rank) for component, lora in loras.items()}
        for component, lora in loras.items():  # every model checked before any changes
            check_injectable(models[component], lora)
        for component, lora in loras.items():
            inject(models[component], lora)
        for model in models.values():  # the new adapter is the active one, in every model
            if attached_names(model):
                set_weights(model, {name: 1.0} if name in attached_names(model) else {})
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
        wanted = dict(zip(names, weights, strict=True))
        missing = sorted(set(wanted) - set(self._attached()))
        if missing:
            raise KeyError(f"no LoRA named {missing} is attached to this pipeline; attached: {self._attached()}")
        for model in self._lora_models().values():
            held = attached_names(model)
            if held:
                set_weights(model, {n: w for n, w in wanted.items() if n in held})

    def get_active_adapters(self) -> list[str]:
        """The attached adapters with a weight other than 0, in any model."""
        active: dict[str, None] = {}
        for model in self._lora_models().values():
            for module in model.modules():
                if isinstance(module, LoRALayer):
                    active.update(dict.fromkeys(n for n, w in module.weights.items() if w != 0.0))
        return list(active)

    def disable_lora(self) -> None:
        """Run the denoiser and text encoders without their adapters, which stay attached at their weights."""
        for model in self._lora_models().values():
            set_enabled(model, False)

    def enable_lora(self) -> None:
        """Switch the adapters on again after :meth:`disable_lora`."""
        for model in self._lora_models().values():
            set_enabled(model, True)

    def fuse_lora(self) -> None:
        """Add the active adapters, at their weights, into the weights of the denoiser and text encoders (faster steps)."""
        models = self._lora_models().values()
        for model in models:  # all or none: a quantized weight anywhere refuses before any is fused
            for module in model.modules():
                if isinstance(module, LoRALayer):
                    module.check_fusable()
        for model in models:
            fuse(model)

    def unfuse_lora(self) -> None:
        """Restore the weights as they were before :meth:`fuse_lora`, bit for bit."""
        for model in self._lora_models().values():
            unfuse(model)

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Remove the named adapters; layers left without one get their original module back."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = sorted(set(names) - set(self._attached()))
        if missing:
            raise KeyError(f"no LoRA named {missing} is attached to this pipeline; attached: {self._attached()}")
        for model in self._lora_models().values():
            for name in attached_names(model):
                if name in names:
                    eject(model, name)

    def unload_lora_weights(self) -> None:
        """Unfuse and remove every adapter: the denoiser and text encoders are their original selves again."""
        for model in self._lora_models().values():
            for name in attached_names(model):
                eject(model, name)

    def _attached(self) -> list[str]:
        names: dict[str, None] = {}
        for model in self._lora_models().values():
            names.update(dict.fromkeys(attached_names(model)))
        return list(names)

    def _lora_models(self) -> dict[str, nn.Module]:
        """The models a LoRA may update: :data:`DENOISER` (the ``unet`` or ``transformer``) and the text encoders present."""
        components = self.components
        found = [unwrap_compiled(components[n]) for n in DENOISER_NAMES if n in components]
        if not found or not isinstance(found[0], nn.Module):
            raise ValueError(f"LoRA attaches to a pipeline's {' or '.join(DENOISER_NAMES)}; this pipeline has neither")
        models = {DENOISER: found[0]}
        for name in TEXT_ENCODER_NAMES:
            encoder = unwrap_compiled(components.get(name))
            if isinstance(encoder, nn.Module):
                models[name] = encoder
        return models


def lora_parts(
    tensors: Mapping[str, Tensor], models: dict[str, nn.Module], name: str, source: LoRASource
) -> dict[str, LoRA]:
    """A LoRA file's tensors as one LoRA per model it updates, keyed like ``models``; a part for a model not there is an error."""
    loras: dict[str, LoRA] = {}
    for component, part in split_by_model(tensors).items():
        if component not in models:
            what = "a denoiser" if component == DENOISER else component
            raise ValueError(_MSG_NO_MODEL.format(count=len(part), component=what, key=next(iter(part))))
        loras[component] = LoRA.from_state_dict(
            part, models[component], name=name, prefixes=prefixes_of(component), source=source
        )
    return loras


__all__ = ["DEFAULT_WEIGHT_NAME", "TEXT_ENCODER_NAMES", "AbstractLoRAMethods", "lora_parts"]
