"""IP-Adapters saved with a preset: the weights and image encoder beside it, the same pipeline and image after from_pretrained."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffblocks.blocks import Pipeline
from diffblocks.components.containment import RepositoryPathError
from diffblocks.components.models.ip_adapter import load_ip_adapter_file
from tests.hub_server import StandInHub
from tests.hubcache import add_cached_repo, use_hub_cache
from tests.ip_adapter.ip_files import SIZE, picture

KWARGS: dict[str, Any] = dict(prompt="a red circle", height=SIZE, width=SIZE, num_inference_steps=2, output_type="np", progress=False)
SCALE = {"down": {"block_1": 0.0}, "up": {"block_0": [0.5, 1.0]}}


def run(pipe: Pipeline, **kwargs: Any) -> np.ndarray:
    return pipe(**{**KWARGS, **kwargs}, generator=torch.Generator().manual_seed(5)).images


def entry(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "modular_model_index.json").read_text())["_diffblocks_ip_adapter"]


def test_two_adapters_with_scales_save_and_load_to_the_same_image(sd15: tuple[Path, Path], tmp_path: Path) -> None:
    repo, ip = sd15
    pipe = Pipeline.from_pretrained(str(repo))
    plain = run(pipe)
    pipe.load_ip_adapter(str(ip), subfolder="models", weight_name=["plain.safetensors", "plus.safetensors"])
    pipe.set_ip_adapter_scale([0.6, SCALE])
    tree, adapter, encoder = repr(pipe.blocks), pipe.components["ip_adapter"], pipe.components["image_encoder"]
    images = dict(ip_adapter_image=[picture(1), picture(2)])
    expected = run(pipe, **images)
    assert not np.array_equal(expected, plain)
    saved = pipe.save_pretrained(tmp_path / "saved")

    recorded = entry(saved)
    assert recorded["files"] == ["ip_adapter/ip_adapter_0.safetensors", "ip_adapter/ip_adapter_1.safetensors"]
    assert recorded["scales"][0] == [0.6] * len(recorded["scales"][0]) and recorded["image_encoder"] == "image_encoder"
    # the weights are in the original files' layout, and the tree and UNet are saved as the pipeline's without it
    written = load_file(saved / recorded["files"][1])
    original = load_file(ip / "models" / "plus.safetensors")
    assert written.keys() == original.keys() and all(torch.equal(written[k], v) for k, v in original.items())
    assert load_ip_adapter_file(saved / recorded["files"][0]).scales == (1.0,) * len(recorded["scales"][0])
    index = json.loads((saved / "modular_model_index.json").read_text())
    assert "ip_adapter" not in index and "_diffblocks_tree" not in index
    # the pipeline saved keeps its adapters, the very objects, with their scales
    assert repr(pipe.blocks) == tree and pipe.components["ip_adapter"].adapters[0] is adapter.adapters[0]
    assert pipe.components["image_encoder"] is encoder
    assert np.array_equal(run(pipe, **images), expected)

    back = Pipeline.from_pretrained(str(saved))
    assert repr(back.blocks) == tree
    assert [a.scales for a in back.components["ip_adapter"]] == [a.scales for a in adapter]
    assert np.array_equal(run(back, **images), expected)
    assert np.array_equal(run(back), plain)
    again = back.save_pretrained(tmp_path / "again")
    assert entry(again) == recorded
    back.unload_ip_adapter()
    resaved = back.save_pretrained(tmp_path / "again")  # saved without it: its files go with the previous save's
    assert "_diffblocks_ip_adapter" not in json.loads((resaved / "modular_model_index.json").read_text())
    assert not (resaved / "ip_adapter").exists() and not (resaved / "image_encoder").exists()


def test_an_adapter_by_value_without_an_encoder_and_a_changed_file(sd15: tuple[Path, Path], tmp_path: Path) -> None:
    repo, ip = sd15
    pipe = Pipeline.from_pretrained(str(repo))
    pipe.load_ip_adapter(load_ip_adapter_file(ip / "models" / "plain.safetensors"))  # no image encoder: embeds only
    embeds = [torch.randn(1, 16, generator=torch.Generator().manual_seed(0))]
    expected = run(pipe, ip_adapter_image_embeds=embeds)
    saved = pipe.save_pretrained(tmp_path / "saved")
    assert entry(saved)["image_encoder"] is None and not (saved / "image_encoder").exists()
    back = Pipeline.from_pretrained(str(saved))
    assert "image_encoder" not in back.components
    assert np.array_equal(run(back, ip_adapter_image_embeds=embeds), expected)

    index = saved / "modular_model_index.json"
    data = json.loads(index.read_text())
    (saved / "ip_adapter/ip_adapter_0.safetensors").write_bytes((ip / "models" / "plus.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"ip_adapter_0\.safetensors: its sha256 is .* for IP-Adapter 'adapter 0'"):
        Pipeline.from_pretrained(str(saved))
    data["_diffblocks_ip_adapter"]["files"] = ["../outside.safetensors"]
    index.write_text(json.dumps(data))
    with pytest.raises(RepositoryPathError, match="names '../outside.safetensors'"):
        Pipeline.from_pretrained(str(saved))
    data["_diffblocks_ip_adapter"] |= {"files": ["a", "b"]}
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="(?s)is not an IP-Adapter record .*2 files, 1 hashes and 1 scale lists"):
        Pipeline.from_pretrained(str(saved))


def test_push_to_hub_round_trips(sd15: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    repo, ip = sd15
    cache = use_hub_cache(monkeypatch, tmp_path / "cache")
    pipe = Pipeline.from_pretrained(str(repo))
    pipe.load_ip_adapter(str(ip), subfolder="models", weight_name="full.safetensors")
    pipe.set_ip_adapter_scale(0.7)
    expected = run(pipe, ip_adapter_image=picture(3))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with StandInHub(lifetime=120) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        info = pipe.push_to_hub("me/tiny-sd15-ip", token="test-token")
    exported = tmp_path / "exported"
    commit = hub.export("me/tiny-sd15-ip", exported)
    assert commit == info.oid and (exported / "image_encoder" / "config.json").is_file()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_cached_repo(cache, "me/tiny-sd15-ip", exported, commit=commit)
    back = Pipeline.from_pretrained("me/tiny-sd15-ip")
    assert np.array_equal(run(back, ip_adapter_image=picture(3)), expected)
