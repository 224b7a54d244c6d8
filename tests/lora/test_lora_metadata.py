"""LoRA files whose alpha is in diffusers' adapter metadata (``lora_alpha != r``): read at diffusers' scale."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from diffblocks.components.lora import LoRA, inject, read_lora_file
from diffblocks.components.lora.formats import METADATA_KEY, metadata_alphas
from tests.lora.lora_files import FLUX_TARGETS, SD15, UNET_TARGETS
from tests.lora.test_unet_lora import _pair, _run
from tests.models.test_flux import _inputs, _ours_from, _reference, _run_ours, _run_ref

# alpha 8 at rank 4 (scale 2), a layer at its own rank, and layers at their own alpha: every field diffusers reads
CONFIG: dict[str, Any] = {"r": 4, "lora_alpha": 8, "rank_pattern": {"to_v": 2}, "alpha_pattern": {"to_k": 1, "conv1": 3}}


def _unet_file(ref: torch.nn.Module, folder: Path, **config: Any) -> Path:
    model = copy.deepcopy(ref)
    torch.manual_seed(3)
    model.add_adapter(LoraConfig(target_modules=UNET_TARGETS, init_lora_weights=False, **config))
    metadata = model.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(model), unet_lora_adapter_metadata=metadata, safe_serialization=True
    )
    return folder / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("config", [CONFIG, {"r": 4, "lora_alpha": 6, "use_rslora": True}], ids=["patterns", "rslora"])
def test_unet_file_with_lora_alpha_in_its_metadata_matches_diffusers(config: dict[str, Any], tmp_path: Path) -> None:
    ref, ours = _pair(SD15, tmp_path)
    path = _unet_file(ref, tmp_path / "lora", **config)
    assert "alpha" not in " ".join(load_file(path))  # the alpha lives in the metadata only
    # a weight_name ending in .safetensors: diffusers reads the metadata only then
    ref.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="unet", adapter_name="a")
    lora = LoRA.from_file(path, ours, name="a")
    assert {u.scale for u in lora.layers.values()} != {1.0}
    inject(ours, lora)
    assert ref.mid_block.attentions[0].transformer_blocks[0].attn1.to_q.scaling["a"] != 1.0
    torch.testing.assert_close(_run(ours, SD15), _run(ref, SD15), atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
def test_pipeline_reads_the_metadata_alpha(tmp_path: Path) -> None:
    """``load_lora_weights`` reads files through the same reader: the alpha reaches the pipeline's UNet."""
    ref, ours = _pair(SD15, tmp_path)
    path = _unet_file(ref, tmp_path / "lora", **CONFIG)
    tensors = read_lora_file(path)
    key = next(k for k in tensors if k.endswith("attn1.to_k.alpha"))
    assert float(tensors[key]) == 1.0 and float(tensors[key.replace("to_k", "to_q")]) == 8.0
    assert float(tensors[key.replace("to_k", "to_v")]) == 8.0 and tensors[key.replace("to_k.alpha", "to_v.lora_A.weight")].shape[0] == 2


def test_flux_file_with_lora_alpha_in_its_metadata_matches_diffusers(tmp_path: Path) -> None:
    ref = _reference(True)
    ours = _ours_from(ref)
    inputs = _inputs(True)
    model = copy.deepcopy(ref)
    torch.manual_seed(4)
    model.add_adapter(LoraConfig(r=4, lora_alpha=16, alpha_pattern={"proj_mlp": 2}, target_modules=FLUX_TARGETS, init_lora_weights=False))
    FluxPipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
        safe_serialization=True,
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    ref.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="transformer", adapter_name="a")
    assert ref.transformer_blocks[0].attn.to_q.scaling["a"] == 4.0
    inject(ours, LoRA.from_file(path, ours, name="a"))
    torch.testing.assert_close(_run_ours(ours, inputs), _run_ref(ref, inputs), atol=1e-5, rtol=0)


def _with_metadata(tmp_path: Path, metadata: str) -> Path:
    path = tmp_path / "bad.safetensors"
    save_file({"unet.x.lora_A.weight": torch.ones(4, 3), "unet.x.lora_B.weight": torch.ones(3, 4)}, path, metadata={METADATA_KEY: metadata})
    return path


def test_bad_metadata_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lora_adapter_metadata metadata is not JSON"):
        read_lora_file(_with_metadata(tmp_path, "{oops"))
    with pytest.raises(ValueError, match="layer 'x' has rank 4, but the file's metadata gives it rank 8"):
        read_lora_file(_with_metadata(tmp_path, json.dumps({"unet.r": 8, "unet.lora_alpha": 8})))
    with pytest.raises(ValueError, match="DoRA"):
        read_lora_file(_with_metadata(tmp_path, json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.use_dora": True})))


def test_an_alpha_key_in_the_file_wins_over_the_metadata() -> None:
    tensors = {"unet.x.lora_A.weight": torch.ones(4, 3), "unet.x.alpha": torch.tensor(1.0), "unet.y.lora_A.weight": torch.ones(4, 3)}
    assert set(metadata_alphas(tensors, {"unet.r": 4, "unet.lora_alpha": 8})) == {"unet.y.alpha"}
