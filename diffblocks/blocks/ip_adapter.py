"""The diffusers-style IP-Adapter methods of a pipeline: load, set the scales, unload.

``load_ip_adapter`` reads IP-Adapter files (or takes :class:`IPAdapterModel` values), adds them and
the CLIP image encoder as the components ``ip_adapter`` and ``image_encoder``, and inserts
:class:`~diffblocks.blocks.standard.ip_adapter.EncodeImagePrompt` before guidance in every UNet
workflow; the denoise blocks pass the adapter to the UNet's denoiser. The UNet's weights are never
changed: a FaceID file's LoRA is attached to it as the LoRA adapter ``faceid_<i>`` (the i-th
IP-Adapter; diffusers' name), and ``unload_ip_adapter`` ejects it and takes the blocks and
components away again. A Flux pipeline takes Flux IP-Adapters (XLabs' files,
:class:`FluxIPAdapterModel`) the same way: then ``EncodeFluxImagePrompt`` runs before
``prepare_flux_conditions`` and the transformer's denoiser reads them.

The standard blocks sit above this layer (they import ``diffblocks.blocks``), so the block class is
found by name in :data:`diffblocks.registry.BLOCKS`, as saved block trees find it.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from transformers import CLIPVisionModelWithProjection

from diffblocks.blocks.block import AbstractBlock
from diffblocks.blocks.composites import Sequence as SequenceBlock
from diffblocks.blocks.tree import inserted, join, removed, walk
from diffblocks.components.compiled import unwrap_compiled
from diffblocks.components.containment import contained_path
from diffblocks.components.hub import resolve_folder
from diffblocks.components.lora import LoRA, LoRAWeights, adapter_names, eject, inject, is_fused
from diffblocks.components.memory.policies import execution_device
from diffblocks.components.models.flux import FluxTransformer2DModel
from diffblocks.components.models.ip_adapter import (
    FluxIPAdapterModel,
    IPAdapterModel,
    MultiFluxIPAdapterModel,
    MultiIPAdapterModel,
    cross_attention_layers,
    expand_flux_scales,
    expand_scales,
    flux_ip_adapters,
    ip_adapters,
    load_any_ip_adapter_file,
)
from diffblocks.components.models.ip_adapter.flux import FluxScale
from diffblocks.components.models.ip_adapter.scales import ScaleSpec
from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.registry import BLOCKS

ENCODE_BLOCK = ("diffblocks", "EncodeImagePrompt")
FLUX_ENCODE_BLOCK = ("diffblocks", "EncodeFluxImagePrompt")

BLOCK_NAME = "encode_image_prompt"
_MSG_NO_SITE = (
    "{name!r} has no workflow with a {site} step: IP-Adapter blocks are added to the UNet families' "
    "workflows (SD 1.x/2.x, SDXL) before prepare_guidance, and to Flux's before prepare_flux_conditions"
)
_MSG_FAMILY = (
    "the IP-Adapter ({adapter}) does not fit the {target} ({shape}): it is made for {made_for}. "
    "An IP-Adapter is trained for one base model: load the one made for this pipeline's family"
)
_MSG_ENCODER = (
    "the image encoder ({encoder}) does not fit IP-Adapter {i}, which reads {what} of width {want}: "
    "load the image encoder the IP-Adapter was trained with (its repository's image_encoder folder)"
)
_MSG_NOT_LOADED = "no IP-Adapter is loaded: call pipe.load_ip_adapter(...) first"
_MSG_LORA_NAME = (
    "IP-Adapter {i} is a FaceID adapter, whose LoRA is attached to the UNet as {name!r}, but a LoRA of that name "
    "is attached already: delete it (pipe.delete_adapters({name!r})) first"
)
_MSG_FUSED = (
    "the UNet's LoRA adapters are fused: unfuse them (pipe.unfuse_lora()) before {verb} a FaceID IP-Adapter, whose LoRA is one of them"
)
FACEID_LORA = "faceid_{i}"
"""The LoRA adapter name of the i-th IP-Adapter's FaceID LoRA (diffusers' name)."""

Adapter = IPAdapterModel | FluxIPAdapterModel
Source = str | os.PathLike[str] | IPAdapterModel | FluxIPAdapterModel
Target = UNet2DConditionModel | FluxTransformer2DModel
T = TypeVar("T")


def ip_adapter_blocks(root: AbstractBlock, *, flux: bool = False) -> AbstractBlock:
    """A new tree where ``EncodeImagePrompt`` runs before ``prepare_guidance`` in every workflow that has one.

    With ``flux``, ``EncodeFluxImagePrompt`` runs before ``prepare_flux_conditions``.

    Raises:
        ValueError: the tree has no such workflow.
    """
    block = BLOCKS.resolve(FLUX_ENCODE_BLOCK if flux else ENCODE_BLOCK)
    site_name = "prepare_flux_conditions" if flux else "prepare_guidance"
    sites = [
        join(node.path, site_name)
        for node in walk(root)
        if isinstance(node.block, SequenceBlock) and site_name in node.block.child_names()
        and BLOCK_NAME not in node.block.child_names()
    ]  # fmt: skip
    if not sites and not any(isinstance(node.block, block) for node in walk(root)):
        raise ValueError(_MSG_NO_SITE.format(name=root.name, site=site_name))
    for site in sites:
        root = inserted(root, block(name=BLOCK_NAME), before=site)
    return root


def without_ip_adapter_blocks(root: AbstractBlock) -> AbstractBlock:
    """A new tree without the ``EncodeImagePrompt`` (or ``EncodeFluxImagePrompt``) steps :func:`ip_adapter_blocks` added."""
    blocks = (BLOCKS.resolve(ENCODE_BLOCK), BLOCKS.resolve(FLUX_ENCODE_BLOCK))
    for path in [node.path for node in walk(root) if isinstance(node.block, blocks)]:
        root = removed(root, path)
    return root


def adapter_mismatch(adapter: Adapter, target: Target) -> str | None:
    """Why ``adapter`` cannot act on ``target`` (a UNet or a Flux transformer), naming both, or None when it fits."""
    if isinstance(adapter, IPAdapterModel) and isinstance(target, UNet2DConditionModel):
        return adapter.mismatch(target)
    if isinstance(adapter, FluxIPAdapterModel) and isinstance(target, FluxTransformer2DModel):
        return adapter.mismatch(target)
    if isinstance(adapter, IPAdapterModel) and isinstance(target, FluxTransformer2DModel):
        p = target.params
        shape = f"{p.num_layers} double blocks, joint_attention_dim {p.joint_attention_dim}, width {p.inner_dim}"
        layers = [(layer.to_k_ip.in_features, layer.to_k_ip.out_features) for layer in adapter.layers]
        described = f"a UNet's: {len(layers)} cross-attention layers, cross_attention_dim {layers[0][0] if layers else None}"
        return _MSG_FAMILY.format(adapter=described, target="Flux transformer", shape=shape, made_for="SD 1.x/2.x or SDXL")
    assert isinstance(adapter, FluxIPAdapterModel)  # the one pair left: a Flux adapter, a UNet
    dims = [attn.key_dims for _, attn in cross_attention_layers(target)]
    shape = f"{len(dims)} cross-attention layers, cross_attention_dim {dims[0][0] if dims else None}"
    return _MSG_FAMILY.format(adapter=adapter.describe(), target="UNet", shape=shape, made_for="Flux")


class AbstractIPAdapterMethods(ABC):
    """``load_ip_adapter``, ``set_ip_adapter_scale``, ``unload_ip_adapter``."""

    @property
    @abstractmethod
    def components(self) -> dict[str, Any]: ...

    @property
    @abstractmethod
    def blocks(self) -> AbstractBlock: ...

    @abstractmethod
    def _change(self, root: AbstractBlock, components: Mapping[str, Any], *, drop: Iterable[str] = ()) -> None: ...

    def load_ip_adapter(
        self,
        path_or_repo: Source | Sequence[Source],
        subfolder: str | Sequence[str | None] | None = None,
        weight_name: str | Sequence[str | None] | None = None,
        *,
        image_encoder: CLIPVisionModelWithProjection | str | os.PathLike[str] | None = None,
        image_encoder_folder: str | None = "image_encoder",
        allow_pickle: bool = False,
    ) -> None:
        """Attach one IP-Adapter, or several (lists), replacing any loaded before; each acts at scale 1.0.

        The call then takes ``ip_adapter_image=`` (or ``ip_adapter_image_embeds=``) in text2img,
        img2img and inpaint. The UNet (or Flux transformer) weights are not changed: the adapter is
        the component ``ip_adapter``, and a FaceID adapter's LoRA is attached to the UNet as the LoRA
        adapter ``faceid_<i>`` at weight 1.0 (the other LoRA adapters keep their weights). A Flux
        pipeline reads XLabs' files (``XLabs-AI/flux-ip-adapter``, ``weight_name="ip_adapter.safetensors"``,
        with ``image_encoder="openai/clip-vit-large-patch14"``).

        Args:
            path_or_repo: an IP-Adapter file, a folder or Hub repository holding one, or an
                :class:`IPAdapterModel` / :class:`FluxIPAdapterModel` (by value); a list for several.
            subfolder: where the file lies in the repository (``"models"``, ``"sdxl_models"``).
            weight_name: the file (``"ip-adapter_sd15.safetensors"``); a ``.bin`` needs ``allow_pickle``.
            image_encoder: a ``CLIPVisionModelWithProjection``, or a folder or repository holding
                one. None: the pipeline's own, else ``image_encoder_folder`` inside ``subfolder``
                of the first repository when it has one and an adapter reads CLIP features (plain
                FaceID does not), else none (then only ``ip_adapter_image_embeds`` can be given).
            image_encoder_folder: the folder looked for when ``image_encoder`` is None.
            allow_pickle: read pickled ``.bin`` files; only for files from a source you trust.

        Raises:
            ValueError: an adapter for another family or size than the UNet or transformer, or an
                image encoder of another width than an adapter reads (naming both), a LoRA named
                ``faceid_<i>`` attached already; nothing changes.
        """
        target = self._ip_adapter_target()
        many = [v for v in (path_or_repo, subfolder, weight_name) if isinstance(v, Sequence) and not isinstance(v, str)]
        n = len(many[0]) if many else 1  # one repository may hold several adapters, as in diffusers
        sources = _spread(path_or_repo, n, "path_or_repo")
        subfolders = _spread(subfolder, n, "subfolder")
        weight_names = _spread(weight_name, n, "weight_name")
        parameter = next(target.parameters())
        device, dtype = execution_device(target) or parameter.device, parameter.dtype
        adapters: list[Adapter] = []
        for source, sub, name in zip(sources, subfolders, weight_names, strict=True):
            if isinstance(source, (IPAdapterModel, FluxIPAdapterModel)):
                adapter: Adapter = source
            else:
                adapter = load_any_ip_adapter_file(_file(source, sub, name), allow_pickle=allow_pickle)
            problem = adapter_mismatch(adapter, target)
            if problem is not None:
                raise ValueError(problem)
            adapters.append(adapter.to(device=device, dtype=dtype))
        # plain FaceID reads no CLIP feature: a repository's encoder (ViT-H: 2.5 GB) is not loaded for it
        reads_clip = any(not isinstance(adapter, IPAdapterModel) or not adapter.reads_face_embeddings or adapter.clip_dim is not None
                         for adapter in adapters)
        encoder = self._image_encoder(image_encoder, sources[0], subfolders[0], image_encoder_folder if reads_clip else None)
        if encoder is not None:
            encoder = encoder.to(device=device, dtype=dtype).eval()
            for i, adapter in enumerate(adapters):
                _check_encoder(encoder, adapter, i)
        flux = isinstance(target, FluxTransformer2DModel)
        loras = _faceid_loras(target, adapters)
        ours = self._faceid_lora_names()
        clash = sorted(set(adapter_names(target)) & {lora.name for lora in loras} - ours)
        if clash:
            raise ValueError(_MSG_LORA_NAME.format(i=clash[0].removeprefix("faceid_"), name=clash[0]))
        if (loras or ours) and is_fused(target):
            raise ValueError(_MSG_FUSED.format(verb="loading"))
        component = adapters[0] if len(adapters) == 1 else _multi(adapters, flux=flux)
        added: dict[str, Any] = {"ip_adapter": component}
        if encoder is not None:
            added["image_encoder"] = encoder
        for name in ours:  # the FaceID LoRA of the adapters replaced
            eject(target, name)
        for lora in loras:
            inject(target, lora)
        self._change(ip_adapter_blocks(self.blocks, flux=flux), added)

    def set_ip_adapter_scale(self, scale: ScaleSpec | Sequence[ScaleSpec] | FluxScale | Sequence[FluxScale]) -> None:
        """Set each IP-Adapter's scale: one value or dict for all, or a list with one per adapter.

        A number scales every layer; a dict ``{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0":
        [0.0, 1.0, 0.0]}, "mid": 0.5}`` scales the spatial transformers it names and sets the rest
        to 0 (diffusers' ``set_ip_adapter_scale``; InstantStyle's "style only" and "style and
        layout" settings are of this form). For Flux, as diffusers' Flux pipelines take it: a
        number, or a list of one per double block; with several adapters, a list of one such
        entry per adapter (:func:`~diffblocks.components.models.ip_adapter.expand_flux_scales`).

        Raises:
            ValueError: a block that does not exist or has no attention (naming those that do), a
                list of another length than the adapters (or, for Flux, than the double blocks); nothing changes.
        """
        adapters = self._ip_adapters()
        target = self._ip_adapter_target()
        if isinstance(target, FluxTransformer2DModel):
            flux_scales = expand_flux_scales(cast(Any, scale), num_layers=target.params.num_layers, num_adapters=len(adapters))
            for adapter, values in zip(adapters, flux_scales, strict=True):
                adapter.set_scales(values)
            return
        specs = list(scale) if isinstance(scale, list) else [scale]
        if len(specs) == 1:
            specs *= len(adapters)
        if len(specs) != len(adapters):
            raise ValueError(f"set_ip_adapter_scale got {len(specs)} scales for {len(adapters)} IP-Adapters: give one for all, or one per adapter")
        expanded = [expand_scales(target, cast(ScaleSpec, spec)) for spec in specs]  # every spec checked before any is set
        for adapter, scales in zip(adapters, expanded, strict=True):
            adapter.set_scales(scales)

    def unload_ip_adapter(self) -> None:
        """Take the IP-Adapter blocks and the ``ip_adapter`` and ``image_encoder`` components away, and FaceID's LoRA off the UNet.

        Raises:
            ValueError: a FaceID adapter is loaded and the UNet's LoRA adapters are fused (unfuse first); nothing changes.
        """
        self._ip_adapters()
        target = self._ip_adapter_target()
        names = self._faceid_lora_names()
        if names and is_fused(target):  # ejecting one adapter out of fused weights would unfuse only its layers
            raise ValueError(_MSG_FUSED.format(verb="unloading"))
        for name in names:
            eject(target, name)
        self._change(without_ip_adapter_blocks(self.blocks), {}, drop=("ip_adapter", "image_encoder"))

    def _faceid_lora_names(self) -> set[str]:
        """The LoRA adapters that the loaded IP-Adapters' FaceID LoRA are attached as (none loaded: empty)."""
        component = self.components.get("ip_adapter")
        if not isinstance(component, (IPAdapterModel, MultiIPAdapterModel)):
            return set()
        attached = adapter_names(self._ip_adapter_target())
        held = {FACEID_LORA.format(i=i) for i, adapter in enumerate(ip_adapters(component)) if adapter.lora_dims}
        return held & set(attached)

    def _ip_adapters(self) -> tuple[Adapter, ...]:
        component = self.components.get("ip_adapter")
        if isinstance(component, (FluxIPAdapterModel, MultiFluxIPAdapterModel)):
            return flux_ip_adapters(component)
        if not isinstance(component, (IPAdapterModel, MultiIPAdapterModel)):
            raise ValueError(_MSG_NOT_LOADED)
        return ip_adapters(component)

    def _ip_adapter_target(self) -> Target:
        """The model the IP-Adapter acts on: the pipeline's UNet, or its Flux transformer."""
        transformer = unwrap_compiled(self.components.get("transformer"))
        if isinstance(transformer, FluxTransformer2DModel):
            return transformer
        unet = unwrap_compiled(self.components.get("unet"))
        if not isinstance(unet, UNet2DConditionModel):
            raise ValueError(
                "IP-Adapter acts on a pipeline's UNet2DConditionModel 'unet' or FluxTransformer2DModel 'transformer'; "
                f"this pipeline has {type(unet if unet is not None else transformer).__name__}"
            )
        return unet

    def _image_encoder(
        self, given: CLIPVisionModelWithProjection | str | os.PathLike[str] | None, source: Source, subfolder: str | None, folder: str | None
    ) -> CLIPVisionModelWithProjection | None:
        if isinstance(given, CLIPVisionModelWithProjection):
            return given
        if given is not None:
            return CLIPVisionModelWithProjection.from_pretrained(resolve_folder(given))
        current = self.components.get("image_encoder")
        if isinstance(current, CLIPVisionModelWithProjection) or folder is None or isinstance(source, (IPAdapterModel, FluxIPAdapterModel)):
            return current if isinstance(current, CLIPVisionModelWithProjection) else None
        if Path(source).is_file():
            return None
        inner = folder if "/" in folder or subfolder is None else f"{subfolder}/{folder}"
        try:
            found = resolve_folder(source, subfolder=inner)
        except FileNotFoundError:
            return None
        return CLIPVisionModelWithProjection.from_pretrained(found)


def _file(source: str | os.PathLike[str], subfolder: str | None, weight_name: str | None) -> Path:
    local = Path(source).expanduser()
    if local.is_file():
        return local
    if weight_name is None:
        raise ValueError(f"{str(source)!r} is a folder or repository: name the IP-Adapter file in it with weight_name")
    pattern = f"{subfolder}/{weight_name}" if subfolder else weight_name
    folder = resolve_folder(source, subfolder=subfolder, allow_patterns=[pattern])
    return contained_path(folder, weight_name, repository=str(source), entry="weight_name")


def _faceid_loras(target: Target, adapters: Sequence[Adapter]) -> list[LoRA]:
    """Each FaceID adapter's LoRA, as our LoRA value named ``faceid_<i>``: scale 1 (alpha = rank), as the original applies it.

    Only the UNet families have FaceID adapters; a Flux transformer gets none.
    """
    if not isinstance(target, UNet2DConditionModel):
        return []
    loras = []
    for i, adapter in enumerate(adapters):
        if not isinstance(adapter, IPAdapterModel):
            continue
        updates = adapter.lora_updates(target)
        if updates:
            weights = {path: LoRAWeights(down, up, alpha=float(down.shape[0])) for path, (down, up) in updates.items()}
            loras.append(LoRA(FACEID_LORA.format(i=i), weights))
    return loras


def _spread(value: T | Sequence[T], n: int, field: str) -> list[T]:
    """One value per adapter: a single value repeated, or a list of ``n``."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"load_ip_adapter got {n} IP-Adapters but {len(value)} values of {field}: give one for all, or one per adapter")
    return list(value)


def _multi(adapters: list[Adapter], *, flux: bool) -> MultiIPAdapterModel | MultiFluxIPAdapterModel:
    """Several adapters as one component (each was checked against the pipeline's model, so all are of its family)."""
    if flux:
        return MultiFluxIPAdapterModel(a for a in adapters if isinstance(a, FluxIPAdapterModel))
    return MultiIPAdapterModel(a for a in adapters if isinstance(a, IPAdapterModel))


def _check_encoder(encoder: CLIPVisionModelWithProjection, adapter: Adapter, i: int) -> None:
    config = encoder.config
    if isinstance(adapter, IPAdapterModel) and adapter.reads_face_embeddings:  # FaceID reads no CLIP feature; FaceID-Plus reads the face crop's hidden states
        if adapter.clip_dim is not None and adapter.clip_dim != config.hidden_size:
            what = "the face crop's penultimate hidden states"
            raise ValueError(_MSG_ENCODER.format(encoder=f"hidden_size {config.hidden_size}", i=i, what=what, want=adapter.clip_dim))
        return
    hidden = adapter.reads_hidden_states
    width = int(config.hidden_size if hidden else config.projection_dim)
    if width != adapter.embed_dim:
        described = f"hidden_size {config.hidden_size}, projection_dim {config.projection_dim}"
        what = "the penultimate hidden states" if hidden else "the projected image embedding"
        raise ValueError(_MSG_ENCODER.format(encoder=described, i=i, what=what, want=adapter.embed_dim))


__all__ = ["FACEID_LORA", "AbstractIPAdapterMethods", "adapter_mismatch", "ip_adapter_blocks", "without_ip_adapter_blocks"]
