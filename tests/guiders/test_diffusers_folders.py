"""Folders of the perturbing guiders, saved with family defaults, load in diffusers 0.42.1 and back in ours."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from diffusers import guiders as dg
from diffusers.hooks import HookRegistry
from diffusers.hooks._common import _ATTENTION_CLASSES
from diffusers.hooks.layer_skip import FeedForwardSkipHook, _apply_layer_skip_hook
from diffusers.hooks.smoothed_energy_guidance_utils import _apply_smoothed_energy_guidance_hook
from torch import nn

from diffblocks.components.guiders import (
    FAMILIES,
    AbstractGuider,
    AbstractPerturbedGuider,
    AutoGuidance,
    PerturbedAttentionGuidance,
    SkipLayerGuidance,
    SmoothedEnergyGuidance,
)
from tests.guiders.test_combine import compare
from tests.guiders.test_config import _real_denoisers

UNET_MID = "mid_block.attentions.0.transformer_blocks"
CLASSES: tuple[type[AbstractPerturbedGuider], ...] = (
    PerturbedAttentionGuidance,
    SkipLayerGuidance,
    SmoothedEnergyGuidance,
    AutoGuidance,
)
# What diffusers must read for each family default: (fqn, indices) per layer config.
ATTENTION_STACKS = {
    "sd15": [("mid_block.attentions", [0])],
    "sdxl": [("mid_block.attentions", [0])],
    "flux": [("transformer_blocks", [1])],
    "tiny": [("mid_block.attentions", [0])],
}
SKIP_STACKS = {
    "sd15": [(UNET_MID, [0])],
    "sdxl": [(UNET_MID, list(range(10)))],
    "flux": [("transformer_blocks", [7, 8, 9])],
    "tiny": [(UNET_MID, [0])],
}
# Settings away from the defaults, so the test sees them arrive.
SETTINGS: dict[type[AbstractPerturbedGuider], dict[str, Any]] = {
    PerturbedAttentionGuidance: {"perturbed_guidance_scale": 3.5, "perturbed_guidance_stop": 0.6},
    SkipLayerGuidance: {"skip_layer_guidance_scale": 2.0, "skip_layer_guidance_start": 0.1},
    SmoothedEnergyGuidance: {"seg_guidance_scale": 1.5, "seg_guidance_stop": 0.7},
    AutoGuidance: {"stop": 0.8},
}
PERTURBED_NAME = {
    PerturbedAttentionGuidance: "pred_cond_skip",
    SkipLayerGuidance: "pred_cond_skip",
    SmoothedEnergyGuidance: "pred_cond_seg",
    AutoGuidance: "pred_uncond",  # diffusers' name for the weak prediction, whatever its inputs
}
CASES = [(family, cls) for family in FAMILIES for cls in CLASSES]


def case_id(case: Any) -> str:
    return case if isinstance(case, str) else case.__name__


def their_layer_configs(theirs: Any) -> list[Any]:
    """The layer configs a diffusers guider built from its config (PAG keeps SLG's attribute)."""
    if isinstance(theirs, dg.SmoothedEnergyGuidance):
        return theirs.seg_guidance_config
    if isinstance(theirs, dg.AutoGuidance):
        return theirs.auto_guidance_config
    return theirs.skip_layer_config


def save_and_load(tmp_path: Path, ours: AbstractGuider) -> Any:
    """Save ``ours`` as a pipeline's guider component and load it the way diffusers does."""
    ours.save_pretrained(tmp_path / "guider")
    return getattr(dg, type(ours).__name__).from_pretrained(tmp_path, subfolder="guider")


@pytest.mark.parametrize(("family", "cls"), CASES, ids=case_id)
def test_diffusers_loads_family_defaults(tmp_path: Path, family: str, cls: type[AbstractPerturbedGuider]) -> None:
    ours = cls.for_family(family, **SETTINGS[cls])  # pyright: ignore[reportArgumentType]
    theirs = save_and_load(tmp_path, ours)
    expected = SKIP_STACKS[family] if cls in (SkipLayerGuidance, AutoGuidance) else ATTENTION_STACKS[family]
    assert [(c.fqn, list(c.indices)) for c in their_layer_configs(theirs)] == expected
    written = json.loads((tmp_path / "guider" / "guider_config.json").read_text())
    ignored = set(written) - set(theirs.config) - {"_class_name", "_diffusers_version"}
    assert ignored <= {"family", "weak_condition"}, ignored  # ours only; the rest diffusers takes
    for key in set(written) & set(theirs.config):
        if key != ours.layer_config_key and not key.startswith("_"):
            assert theirs.config[key] == written[key], key
    assert compare(ours, theirs, perturbed_name=PERTURBED_NAME[cls]) <= 1e-6
    assert AbstractGuider.from_pretrained(tmp_path, subfolder="guider") == ours
    assert getattr(cls.from_pretrained(tmp_path / "guider"), ours.layers_field) is None  # still the default


@pytest.fixture(scope="module")
def released() -> dict[str, nn.Module]:
    return _real_denoisers()


def _diffusers_targets(model: nn.Module, theirs: Any) -> Iterator[nn.Module]:
    """The modules diffusers hooks for ``theirs``: its own hook functions, probed on ``model``."""
    for config in their_layer_configs(theirs):
        config = copy.copy(config)
        if isinstance(theirs, dg.SmoothedEnergyGuidance):
            _apply_smoothed_energy_guidance_hook(model, config, 1.0, name="probe")
        else:
            _apply_layer_skip_hook(model, config, name="probe")
    try:
        for name, module in model.named_modules():
            registry = getattr(module, "_diffusers_hook", None)
            hook = registry.get_hook("probe") if isinstance(registry, HookRegistry) else None
            # A skipped block's feed-forward gets a hook too; it matters only for dropout < 1,
            # where our SkipBlocks drops the same feed-forward outputs.
            if hook is not None and not isinstance(hook, FeedForwardSkipHook):
                # SEG hooks an attention's query projection; name the attention, as ours does.
                yield model.get_submodule(name.removesuffix(".to_q"))
    finally:
        HookRegistry.check_if_exists_or_initialize(model).remove_hook("probe", recurse=True)


def _flux_self_attentions(model: nn.Module, theirs: Any) -> Iterator[nn.Module]:
    """Diffusers' rule for attention perturbations, without its hooks (they fail on ``FluxAttention``)."""
    for config in their_layer_configs(theirs):
        for index in config.indices:
            block = model.get_submodule(f"{config.fqn}.{index}")
            attentions = (m for m in block.modules() if isinstance(m, _ATTENTION_CLASSES))
            yield from (m for m in attentions if not getattr(m, "is_cross_attention", False))


@pytest.mark.parametrize(("family", "cls"), CASES, ids=case_id)
def test_same_layers_on_the_released_architectures(
    tmp_path: Path, released: dict[str, nn.Module], family: str, cls: type[AbstractPerturbedGuider]
) -> None:
    model, ours = released[family], cls.for_family(family)  # pyright: ignore[reportArgumentType]
    theirs = save_and_load(tmp_path, ours)
    attention = cls in (PerturbedAttentionGuidance, SmoothedEnergyGuidance)
    targets = _flux_self_attentions if family == "flux" and attention else _diffusers_targets
    expected = list(targets(model, theirs))
    assert expected and {id(m) for m in expected} == {id(m) for m in ours.perturbation.resolve(model)}


def test_explicit_block_layers_are_written_for_diffusers(tmp_path: Path) -> None:
    ours = SkipLayerGuidance(skip_layer_guidance_layers=["single_transformer_blocks.3", "single_transformer_blocks.4"])
    theirs = save_and_load(tmp_path, ours)
    assert [(c.fqn, c.indices) for c in theirs.skip_layer_config] == [("single_transformer_blocks", [3, 4])]
    assert SkipLayerGuidance.from_pretrained(tmp_path / "guider") == ours
    auto = AutoGuidance(auto_guidance_layers=[2, "single_transformer_blocks.0"], dropout=0.25)
    config = auto.to_config()
    assert config["auto_guidance_layers"] is None
    assert [c["dropout"] for c in config["auto_guidance_config"]] == [0.25, 0.25]
    assert AbstractGuider.from_config(json.loads(json.dumps(config))) == auto


def test_layers_without_a_block_index_stay_paths() -> None:
    pag = PerturbedAttentionGuidance(perturbed_guidance_layers=["transformer_blocks.2.attn"])
    config = pag.to_config()
    assert "perturbed_guidance_config" not in config
    assert config["perturbed_guidance_layers"] == ["transformer_blocks.2.attn"]
    assert AbstractGuider.from_config(config) == pag


def test_layers_spelt_as_the_family_default_are_the_default() -> None:
    default = SkipLayerGuidance.for_family("sdxl")
    blocks = [f"{UNET_MID}.{i}" for i in range(10)]
    assert SkipLayerGuidance(family="sdxl", skip_layer_guidance_layers=blocks) == default
    assert SkipLayerGuidance(family="sdxl", skip_layer_guidance_layers=[UNET_MID]) == default
    other = SkipLayerGuidance(family="sdxl", skip_layer_guidance_layers=[f"{UNET_MID}.0"])
    assert other.skip_layer_guidance_layers == (f"{UNET_MID}.0",)
    assert SkipLayerGuidance.from_config(json.loads(json.dumps(other.to_config()))) == other


def test_folders_written_before_layer_configs_still_load() -> None:
    config = {"_class_name": "SmoothedEnergyGuidance", "family": "flux", "seg_guidance_layers": None}
    assert AbstractGuider.from_config(config) == SmoothedEnergyGuidance.for_family("flux")
