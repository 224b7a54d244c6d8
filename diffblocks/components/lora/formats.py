"""LoRA file layouts, each read through one table into ``{our module path: LoRAWeights}``.

A key is a prefix, a layer name and a part. The prefix says how the layer is named:

| prefix | who writes it | layer name | example |
|---|---|---|---|
| ``unet.``, ``transformer.`` | diffusers / PEFT (``pytorch_lora_weights.safetensors``) | our module path | ``unet.down_blocks.0.attentions.0.proj_in`` |
| ``lora_unet_`` | kohya / sd-scripts (LoRA, LoCon) | a module path, ours or the original code's, ``.`` written ``_`` | ``lora_unet_input_blocks_4_1_proj_in`` (SDXL), ``lora_unet_double_blocks_0_img_attn_qkv`` (Flux) |
| ``diffusion_model.``, ``model.diffusion_model.`` | ComfyUI and BFL-layout trainers | the original code's module path | ``diffusion_model.single_blocks.0.linear1`` |

and the part which matrix it is: ``lora_A.weight`` or ``lora_down.weight`` (down), ``lora_B.weight``
or ``lora_up.weight`` (up), ``alpha``. Original names (LDM/SGM for the UNet, BFL for Flux) are
placed by :mod:`diffblocks.components.lora.names`, which splits a fused layer's update by rows.
XLabs' Flux files are rewritten into these names first (:mod:`diffblocks.components.lora.xlabs`).
A missing ``alpha`` means ``alpha = rank`` (scale 1), as in PEFT's default config, unless the
file's safetensors metadata holds the PEFT ``LoraConfig`` that diffusers writes beside the
tensors (``lora_adapter_metadata``, one config per prefix: ``unet.lora_alpha``,
``transformer.alpha_pattern``, ...): :func:`read_lora_file` then writes each layer's alpha from it
as an ``alpha`` key (:func:`metadata_alphas`). Every key of a file must fall into the table; any
that does not is named in the error, never dropped.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, final

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from diffblocks.components.lora.names import Target
from diffblocks.components.lora.xlabs import from_xlabs

Naming = Literal["ours", "flat", "original", "dotted"]
"""How a prefix names layers: our module paths, the original code's, either with ``.`` written ``_`` (flat), or either as it is (dotted)."""

PREFIXES: Mapping[str, Naming] = {
    "unet.": "ours",
    "transformer.": "ours",
    "lora_unet_": "flat",
    "diffusion_model.": "original",
    "model.diffusion_model.": "original",
}
PARTS: Mapping[str, str] = {
    "lora_A.weight": "down",
    "lora_down.weight": "down",
    "lora_B.weight": "up",
    "lora_up.weight": "up",
    "alpha": "alpha",
}
METADATA_KEY = "lora_adapter_metadata"
"""The safetensors metadata entry where diffusers writes a LoRA file's adapter configs (``LORA_ADAPTER_METADATA_KEY``)."""

_MSG_PICKLE = (
    "{path} is a pickle; loading one can run code hidden in it. Prefer the .safetensors file, or pass "
    "allow_pickle=True if you trust its source (it is then read with torch.load(weights_only=True))"
)
_MSG_UNKNOWN = (
    "{count} key(s) of this LoRA file match no layer of {model}: {keys}. The file is "
    "for another model (a text encoder, another family) or in a layout diffblocks does not read yet; "
    "nothing was loaded"
)
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te_", "te1_", "te2_")
_MSG_TEXT_ENCODER = (
    " ({count} of them are for a text encoder: load the file with pipe.load_lora_weights, which gives "
    "each of the pipeline's models its own keys)"
)


@final
@dataclass(frozen=True, slots=True)
class LoRAWeights:
    """One layer's low-rank update ``delta W = (alpha / rank) * up @ down``.

    Args:
        down: ``(rank, in_features)`` for a linear layer, ``(rank, in_channels, kh, kw)`` for a convolution.
        up: ``(out_features, rank)``, or ``(out_channels, rank, 1, 1)``.
        alpha: the scale numerator; ``alpha / rank`` multiplies the update.
    """

    down: Tensor
    up: Tensor
    alpha: float

    def __post_init__(self) -> None:
        rank = self.down.shape[0]
        if self.down.ndim < 2 or self.up.ndim < 2 or rank == 0 or self.up.shape[1] != rank:
            raise ValueError(f"LoRA down {tuple(self.down.shape)} and up {tuple(self.up.shape)} must share a rank above 0")
        if not (torch.isfinite(self.down).all() and torch.isfinite(self.up).all()) or not math.isfinite(self.alpha):
            raise ValueError("LoRA weights hold NaN or infinite values")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def padded(self, rank: int) -> LoRAWeights:
        """The same update at ``rank``: zero rows of ``down`` and zero columns of ``up`` appended.

        ``alpha`` grows with the rank so that ``alpha / rank`` (and so the update) is unchanged;
        diffusers pads the same way for ``enable_lora_hotswap(target_rank=...)``.

        Raises:
            ValueError: ``rank`` is below this update's rank.
        """
        if rank < self.rank:
            raise ValueError(f"a rank-{self.rank} LoRA update cannot be padded down to rank {rank}")
        if rank == self.rank:
            return self
        extra = rank - self.rank
        down = torch.cat([self.down, self.down.new_zeros(extra, *self.down.shape[1:])])
        up = torch.cat([self.up, self.up.new_zeros(self.up.shape[0], extra, *self.up.shape[2:])], dim=1)
        return LoRAWeights(down, up, self.alpha * rank / self.rank)


def read_lora_file(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Tensor]:
    """The tensors of a LoRA file: safetensors, or a pickled ``.bin``/``.pt`` only with ``allow_pickle``.

    A safetensors file's adapter config (diffusers' ``lora_adapter_metadata``) comes back as ``alpha``
    keys, one per layer that has none (:func:`metadata_alphas`), so that every reader scales it as diffusers does.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors = load_file(path)
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        raw = metadata.get(METADATA_KEY)
        return tensors if not raw else {**tensors, **metadata_alphas(tensors, _parse_metadata(raw, path))}
    if not allow_pickle:
        raise ValueError(_MSG_PICKLE.format(path=path))
    return torch.load(path, map_location="cpu", weights_only=True)


def metadata_alphas(tensors: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> dict[str, Tensor]:
    """The ``alpha`` keys that diffusers' adapter metadata implies, for the layers of ``tensors`` that lack one.

    ``metadata`` is the parsed ``lora_adapter_metadata``: PEFT ``LoraConfig`` fields packed per
    prefix (``{"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {...}}``), as
    ``save_lora_weights(..., unet_lora_adapter_metadata=...)`` writes them. A layer's rank and alpha
    follow ``rank_pattern`` / ``alpha_pattern`` first, matched as PEFT's ``get_pattern_key`` does (the
    pattern is a suffix of the module path at a dot), then ``r`` / ``lora_alpha``; its scale is
    ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora`` (Kalajdzievski, 2023), which is written
    as the alpha that gives that scale at the layer's rank.

    Raises:
        ValueError: a layer's rank differs from the one the config gives it, or the config asks for
            DoRA (``use_dora``), which diffblocks does not apply.
    """
    configs: dict[str, dict[str, Any]] = {}
    for key, value in metadata.items():
        prefix, _, name = key.rpartition(".")
        configs.setdefault(prefix, {})[name] = value
    alphas: dict[str, Tensor] = {}
    for prefix, config in configs.items():
        if "lora_alpha" not in config or not prefix:
            continue
        if config.get("use_dora"):
            raise ValueError(f"this LoRA file's {prefix!r} adapter is a DoRA (use_dora in its metadata), which diffblocks does not apply")
        ranks: Mapping[str, int] = config.get("rank_pattern") or {}
        patterns: Mapping[str, float] = config.get("alpha_pattern") or {}
        for key, down in tensors.items():
            if not key.startswith(prefix + ".") or not key.endswith(".lora_A.weight"):
                continue
            module = key[len(prefix) + 1 : -len(".lora_A.weight")]
            if f"{prefix}.{module}.alpha" in tensors:
                continue
            r = int(ranks.get(_pattern_key(ranks, module), config.get("r", down.shape[0])))
            if r != down.shape[0]:
                raise ValueError(f"LoRA layer {module!r} has rank {down.shape[0]}, but the file's metadata gives it rank {r}")
            alpha = float(patterns.get(_pattern_key(patterns, module), config["lora_alpha"]))
            scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            alphas[f"{prefix}.{module}.alpha"] = torch.tensor(scale * r)
    return alphas



def _parse_metadata(raw: str, path: Path) -> dict[str, Any]:
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its {METADATA_KEY} metadata is not JSON ({err}); nothing was loaded") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{path}: its {METADATA_KEY} metadata is not a JSON object; nothing was loaded")
    return parsed


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str:
    """The first pattern that ends ``module`` at a dot (PEFT's ``get_pattern_key``), else ``module`` itself."""
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", module)), module)


def convert(
    state_dict: Mapping[str, Tensor],
    ours: Mapping[str, tuple[Target, ...]],
    original: Mapping[str, tuple[Target, ...]],
    *,
    model: str,
    prefixes: Mapping[str, Naming] = PREFIXES,
) -> dict[str, LoRAWeights]:
    """Read a LoRA state dict into ``{our module path: LoRAWeights}``.

    Args:
        state_dict: the file's tensors.
        ours, original: a layer name (ours, or the original checkpoint's) -> the targets it updates
            (see :func:`~diffblocks.components.lora.names.layer_names`).
        model: the model's class name, for errors.
        prefixes: the key prefixes to read and how each names layers; the denoiser's by default,
            a text encoder's from :data:`~diffblocks.components.lora.text_encoders.TEXT_ENCODER_PREFIXES`.

    Raises:
        ValueError: keys that name no layer of the model (all of them named), a layer without its
            down or up matrix, a rank of 0, or NaN weights.
    """
    state_dict = from_xlabs(state_dict)  # XLabs' processor keys, placed by their own table
    names: dict[Naming, Mapping[str, tuple[Target, ...]]] = {
        "ours": ours,
        "original": original,
        "flat": {name.replace(".", "_"): found for table in (original, ours) for name, found in table.items()},
        "dotted": {**original, **ours},
    }
    grouped: dict[tuple[Target, ...], dict[str, Tensor]] = {}  # by the targets, each seen under one name
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        found = _split(key, prefixes)
        targets = None if found is None else names[found[0]].get(found[1])
        if found is None or targets is None:
            unknown.append(key)
            continue
        parts = grouped.setdefault(targets, {})
        if found[2] in parts:
            raise ValueError(f"LoRA layer {found[1]!r}: its {found[2]} is given twice in this file (under two names)")
        parts[found[2]] = tensor
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (", ..." if len(unknown) > 8 else "")
        text = sum(key.startswith(_TEXT_ENCODER_PREFIXES) for key in unknown)
        raise ValueError(
            _MSG_UNKNOWN.format(count=len(unknown), model=model, keys=shown) + (_MSG_TEXT_ENCODER.format(count=text) if text else "")
        )
    layers: dict[str, LoRAWeights] = {}
    for targets, parts in grouped.items():
        name = " + ".join(t.module for t in targets)
        if "down" not in parts or "up" not in parts:
            raise ValueError(f"LoRA layer {name!r} lacks its {'down' if 'down' not in parts else 'up'} matrix")
        down, up = parts["down"].float(), parts["up"].float()
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        for target in targets:
            if target.module in layers:
                raise ValueError(f"LoRA layer {target.module!r} is given twice in this file (under two names)")
            try:
                layers[target.module] = LoRAWeights(down, target.up(up), alpha)
            except ValueError as error:
                raise ValueError(f"LoRA layer {name!r}: {error}") from None
    return dict(sorted(layers.items()))


def _split(key: str, prefixes: Mapping[str, Naming]) -> tuple[Naming, str, str] | None:
    """``(naming, layer name, part)`` of a key, or None when its prefix or part is not in the table."""
    for prefix, naming in prefixes.items():
        if key.startswith(prefix):
            for suffix, part in PARTS.items():
                if key.endswith("." + suffix):
                    return naming, key[len(prefix) : -len(suffix) - 1], part
    return None


__all__ = ["METADATA_KEY", "PARTS", "PREFIXES", "LoRAWeights", "Naming", "convert", "metadata_alphas", "read_lora_file"]
