"""Config JSON round trips, guider folders, the allowlist, diffusers configs, and family defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from diffusers import guiders as dg

from diffblocks.components.guiders import (
    FAMILIES,
    GUIDERS,
    AbstractGuider,
    AdaptiveProjectedGuidance,
    AutoGuidance,
    ClassifierFreeGuidance,
    ClassifierFreeZeroStarGuidance,
    FrequencyDecoupledGuidance,
    MagnitudeAwareGuidance,
    PerturbedAttentionGuidance,
    SkipLayerGuidance,
    SmoothedEnergyGuidance,
    TangentialClassifierFreeGuidance,
    detach_perturbations,
    guider_from_config,
    register_guider,
)
from diffblocks.components.guiders.base import GUIDER_CONFIG_NAME
from diffblocks.presets.tiny.architecture import UNET_CONFIG

EXAMPLES: list[AbstractGuider] = [
    ClassifierFreeGuidance(guidance_scale=5.5, guidance_rescale=0.7, start=0.1, stop=0.9),
    ClassifierFreeZeroStarGuidance(zero_init_steps=2, use_original_formulation=True),
    AdaptiveProjectedGuidance(adaptive_projected_guidance_momentum=-0.5, adaptive_projected_guidance_norm_dim=(-2, -1)),
    TangentialClassifierFreeGuidance(guidance_scale=3.0),
    PerturbedAttentionGuidance.for_family("sdxl", perturbed_guidance_scale=3.0),
    PerturbedAttentionGuidance(perturbed_guidance_layers=("transformer_blocks.2.attn",)),
    SkipLayerGuidance.for_family("flux", skip_layer_guidance_stop=0.4),
    SmoothedEnergyGuidance.for_family("sd15", seg_blur_sigma=3.0),
    AutoGuidance(auto_guidance_layers=("transformer_blocks.3",), dropout=0.2, weak_condition="cond"),
    FrequencyDecoupledGuidance(guidance_scales=(8.0, 4.0, 2.0), start=(0.0, 0.1, 0.2), parallel_weights=0.5),
    MagnitudeAwareGuidance(alpha=4.0, enabled=False),
]


def test_every_registered_guider_has_an_example() -> None:
    assert {type(g).__name__ for g in EXAMPLES} == set(GUIDERS)


@pytest.mark.parametrize("guider", EXAMPLES, ids=lambda g: type(g).__name__)
def test_json_round_trip(guider: AbstractGuider) -> None:
    config = json.loads(json.dumps(guider.to_config()))
    assert config["_class_name"] == type(guider).__name__
    rebuilt = guider_from_config(config)
    assert type(rebuilt) is type(guider) and rebuilt == guider
    assert AbstractGuider.from_config(config) == guider
    assert type(guider).from_config(config) == guider
    assert rebuilt.passes(3, 20) == guider.passes(3, 20)


@pytest.mark.parametrize("guider", EXAMPLES[:5], ids=lambda g: type(g).__name__)
def test_save_and_load_folder(tmp_path: Path, guider: AbstractGuider) -> None:
    guider.save_pretrained(tmp_path / "guider")
    assert (tmp_path / "guider" / GUIDER_CONFIG_NAME).is_file()
    assert AbstractGuider.from_pretrained(tmp_path, subfolder="guider") == guider
    assert type(guider).from_pretrained(tmp_path / "guider") == guider


def test_unknown_and_mismatched_names() -> None:
    with pytest.raises(ValueError, match=r"Unknown guider 'Nope'; known guiders: AdaptiveProjectedGuidance, "):
        guider_from_config({"_class_name": "Nope"})
    with pytest.raises(ValueError, match="Unknown guider None"):
        guider_from_config({"guidance_scale": 2.0})
    with pytest.raises(ValueError, match="not 'ClassifierFreeGuidance'"):
        ClassifierFreeGuidance.from_config({"_class_name": "AutoGuidance"})
    with pytest.raises(ValueError, match="guidance_scal"):
        ClassifierFreeGuidance.from_config({"guidance_scal": 2.0})
    with pytest.raises(FileNotFoundError):
        ClassifierFreeGuidance.from_pretrained("/nonexistent/guider")


def test_register_guider_refuses_another_class_of_the_same_name() -> None:
    assert register_guider(ClassifierFreeGuidance) is ClassifierFreeGuidance
    clash = type("ClassifierFreeGuidance", (TangentialClassifierFreeGuidance,), {})
    with pytest.raises(ValueError, match="already registered"):
        register_guider(clash)


DIFFUSERS_PAIRS: list[tuple[Any, AbstractGuider]] = [
    (
        dg.ClassifierFreeGuidance(guidance_scale=5.0, guidance_rescale=0.3),
        ClassifierFreeGuidance(guidance_scale=5.0, guidance_rescale=0.3),
    ),
    (
        dg.AdaptiveProjectedGuidance(adaptive_projected_guidance_momentum=-0.5),
        AdaptiveProjectedGuidance(adaptive_projected_guidance_momentum=-0.5),
    ),
    (dg.ClassifierFreeZeroStarGuidance(zero_init_steps=2), ClassifierFreeZeroStarGuidance(zero_init_steps=2)),
    (dg.MagnitudeAwareGuidance(alpha=3.0), MagnitudeAwareGuidance(alpha=3.0)),
    (dg.TangentialClassifierFreeGuidance(stop=0.5), TangentialClassifierFreeGuidance(stop=0.5)),
    (
        dg.PerturbedAttentionGuidance(perturbed_guidance_layers=[1, 2]),
        PerturbedAttentionGuidance(perturbed_guidance_layers=("transformer_blocks.1", "transformer_blocks.2")),
    ),
    (
        dg.SkipLayerGuidance(skip_layer_guidance_layers=[7]),
        SkipLayerGuidance(skip_layer_guidance_layers=("transformer_blocks.7",)),
    ),
    (
        dg.SmoothedEnergyGuidance(seg_guidance_layers=[1]),
        SmoothedEnergyGuidance(seg_guidance_layers=("transformer_blocks.1",)),
    ),
    (
        dg.AutoGuidance(auto_guidance_layers=[0], dropout=0.5),
        AutoGuidance(auto_guidance_layers=("transformer_blocks.0",), dropout=0.5),
    ),
]


@pytest.mark.parametrize(("theirs", "ours"), DIFFUSERS_PAIRS, ids=lambda g: type(g).__name__)
def test_reads_diffusers_guider_folders(tmp_path: Path, theirs: Any, ours: AbstractGuider) -> None:
    theirs.save_pretrained(tmp_path)
    assert AbstractGuider.from_pretrained(tmp_path) == ours


def test_reads_diffusers_layer_configs() -> None:
    config = {
        "_class_name": "SkipLayerGuidance",
        "skip_layer_config": [{"indices": [2, 3], "fqn": "single_transformer_blocks", "dropout": 1.0}],
    }
    guider = guider_from_config(config)
    assert guider.perturbation.targets == ("single_transformer_blocks.2", "single_transformer_blocks.3")
    auto = guider_from_config({"_class_name": "AutoGuidance", "auto_guidance_config": {"indices": 4, "dropout": 0.1}})
    assert isinstance(auto, AutoGuidance) and auto.dropout == 0.1
    with pytest.raises(ValueError, match="not both"):
        SkipLayerGuidance.from_config({**config, "skip_layer_guidance_layers": [1]})


# Perturbed guiders are left out: diffusers names their layers by block index, not by module path.
@pytest.mark.parametrize("guider", EXAMPLES[:4] + EXAMPLES[-2:], ids=lambda g: type(g).__name__)
def test_diffusers_reads_our_folders(tmp_path: Path, guider: AbstractGuider) -> None:
    if isinstance(guider, FrequencyDecoupledGuidance):
        pytest.importorskip("kornia")
    guider.save_pretrained(tmp_path)
    theirs = getattr(dg, type(guider).__name__).from_pretrained(tmp_path)
    for key, value in guider.to_config().items():
        if not key.startswith("_"):
            assert json.loads(json.dumps(theirs.config[key])) == value, key


def _real_denoisers() -> dict[str, torch.nn.Module]:
    """The released architectures, built on the meta device (no memory) to check default paths."""
    sdxl = {
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    }
    with torch.device("meta"):
        return {
            "sd15": UNet2DConditionModel(),
            "sdxl": UNet2DConditionModel(**sdxl),
            "flux": FluxTransformer2DModel(num_layers=19, num_single_layers=38, guidance_embeds=True),
            "tiny": UNet2DConditionModel(**UNET_CONFIG),
        }


def test_family_defaults_resolve_on_the_released_architectures() -> None:
    models = _real_denoisers()
    assert set(models) == set(FAMILIES)
    for family, model in models.items():
        for cls in (PerturbedAttentionGuidance, SkipLayerGuidance, SmoothedEnergyGuidance, AutoGuidance):
            with cls.for_family(family).perturbation.applied(model):  # resolves and hooks every layer
                pass
            detach_perturbations(model)
    sdxl_pag = PerturbedAttentionGuidance.for_family("sdxl").perturbation
    assert len(sdxl_pag.resolve(models["sdxl"])) == 10  # the ten mid-block self-attentions


@pytest.mark.parametrize("scale", ["Infinity", "-Infinity", "NaN"])
def test_a_saved_guider_config_with_an_infinite_or_nan_scale_is_refused(tmp_path: Path, scale: str) -> None:
    # json reads these words as floats; an infinite scale would make every image NaN
    (tmp_path / GUIDER_CONFIG_NAME).write_text(f'{{"_class_name": "ClassifierFreeGuidance", "guidance_scale": {scale}}}')
    with pytest.raises(ValueError, match="guidance_scale\n  Input should be a finite number"):
        ClassifierFreeGuidance.from_pretrained(tmp_path)
