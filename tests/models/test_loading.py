"""Loading and saving diffusers model folders: variants, shards, the Hub cache, pickles, broken files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from diffusers import AutoencoderKL as RefVAE
from huggingface_hub import constants
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from diffblocks.components.models import AbstractComputedBuffers, AbstractModel, AbstractParams, CheckpointError
from diffblocks.components.models.autoencoder_kl import AutoencoderKL

TINY: dict[str, Any] = {
    "block_out_channels": (32,),
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "layers_per_block": 1,
    "sample_size": 8,
}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _reference() -> RefVAE:
    torch.manual_seed(0)
    return RefVAE(**TINY).eval()


def _assert_same_weights(ours: nn.Module, ref: nn.Module, dtype: torch.dtype | None = None) -> None:
    theirs = ref.state_dict()
    assert set(ours.state_dict()) == set(theirs)
    for key, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs[key].to(dtype or tensor.dtype)), key


def test_single_file_loads_every_weight_in_eval_mode(tmp_path: Path) -> None:
    ref = _reference()
    ref.save_pretrained(tmp_path)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    _assert_same_weights(ours, ref)
    assert not ours.training
    assert all(not t.is_meta and t.dtype == torch.float32 for t in ours.state_dict().values())
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters())
    assert ours.memory_bytes() == 4 * ours.num_parameters()


def test_fp16_variant_and_dtype(tmp_path: Path) -> None:
    ref = _reference().half()
    ref.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    upcast = AutoencoderKL.from_pretrained(tmp_path, variant="fp16")
    _assert_same_weights(upcast, ref, torch.float32)  # default: float32, as a freshly built module
    half = AutoencoderKL.from_pretrained(tmp_path, variant="fp16", dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert half.memory_bytes() == upcast.memory_bytes() // 2
    with pytest.raises(FileNotFoundError, match=r"fp16\.safetensors.*pass variant="):
        AutoencoderKL.from_pretrained(tmp_path)


def test_sharded_checkpoints_plain_variant_and_legacy_index(tmp_path: Path) -> None:
    ref = _reference()
    ref.save_pretrained(tmp_path / "plain", max_shard_size="100KB")
    assert (tmp_path / "plain" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    _assert_same_weights(AutoencoderKL.from_pretrained(tmp_path / "plain"), ref)

    ref.save_pretrained(tmp_path / "variant", max_shard_size="100KB", variant="fp16")
    index = tmp_path / "variant" / "diffusion_pytorch_model.safetensors.index.fp16.json"
    assert index.is_file()
    assert any(p.name.startswith("diffusion_pytorch_model.fp16-00001-of-") for p in index.parent.iterdir())
    _assert_same_weights(AutoencoderKL.from_pretrained(tmp_path / "variant", variant="fp16"), ref)
    index.rename(index.with_name("diffusion_pytorch_model.safetensors.fp16.index.json"))  # older diffusers naming
    _assert_same_weights(AutoencoderKL.from_pretrained(tmp_path / "variant", variant="fp16"), ref)


def test_loads_from_the_hub_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--org--tiny"
    ref = _reference()
    ref.save_pretrained(repo / "snapshots" / commit / "vae")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    _assert_same_weights(AutoencoderKL.from_pretrained("org/tiny", subfolder="vae"), ref)
    _assert_same_weights(AutoencoderKL.from_pretrained("org/tiny", subfolder="vae", revision=commit), ref)
    with pytest.raises(FileNotFoundError, match="org/absent"):
        AutoencoderKL.from_pretrained("org/absent", subfolder="vae")


@torch.no_grad()
def test_save_pretrained_round_trips_through_diffusers(tmp_path: Path) -> None:
    ours = AutoencoderKL.from_config(TINY)
    images = torch.randn(1, 3, 8, 8)
    ours.save_pretrained(tmp_path / "single")
    config = json.loads((tmp_path / "single" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["block_out_channels"] == [32]
    ref = RefVAE.from_pretrained(tmp_path / "single").eval()
    assert torch.equal(ref(images).sample, ours.eval()(images))

    ours.save_pretrained(tmp_path / "sharded", max_shard_size=60_000)
    names = {p.name for p in (tmp_path / "sharded").iterdir()}
    assert "diffusion_pytorch_model.safetensors.index.json" in names and WEIGHTS not in names
    _assert_same_weights(ours, RefVAE.from_pretrained(tmp_path / "sharded"))

    ours.save_pretrained(tmp_path / "sharded")  # re-saving unsharded removes the stale shards and index
    assert {p.name for p in (tmp_path / "sharded").iterdir()} == {"config.json", WEIGHTS}

    ours.half().save_pretrained(tmp_path / "single", variant="fp16")
    half = RefVAE.from_pretrained(tmp_path / "single", variant="fp16", torch_dtype=torch.float16)
    _assert_same_weights(ours, half)
    assert (tmp_path / "single" / WEIGHTS).is_file()  # other variants are left alone


def _rewrite(path: Path, edit: Any) -> None:
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path: Path) -> None:
    _reference().save_pretrained(tmp_path)

    def damage(state: dict[str, Tensor]) -> None:
        del state["encoder.conv_in.bias"]
        state["extra.weight"] = torch.zeros(2)
        state["decoder.conv_out.bias"] = torch.zeros(5)

    _rewrite(tmp_path / WEIGHTS, damage)
    with pytest.raises(CheckpointError) as caught:
        AutoencoderKL.from_pretrained(tmp_path)
    message = str(caught.value)
    assert "missing keys: encoder.conv_in.bias (1 in all)" in message
    assert "unexpected keys: extra.weight (1 in all)" in message
    assert "decoder.conv_out.bias (5,) != (3,)" in message

    _rewrite(tmp_path / WEIGHTS, lambda state: [state.pop(k) for k in sorted(state)[:15]])
    with pytest.raises(CheckpointError, match=r"missing keys: .* \.\.\. and 6 more \(16 in all\)"):
        AutoencoderKL.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_broken_files_name_the_file_and_the_fix(damage: str, tmp_path: Path) -> None:
    _reference().save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 16 + data[16:])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS}.*download it again"):
        AutoencoderKL.from_pretrained(tmp_path)


def test_pickles_need_explicit_opt_in(tmp_path: Path) -> None:
    ref = _reference()
    ref.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin.*allow_pickle=True"):
        AutoencoderKL.from_pretrained(tmp_path)
    _assert_same_weights(AutoencoderKL.from_pretrained(tmp_path, allow_pickle=True), ref)


def test_weights_are_never_allocated_randomly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _reference().save_pretrained(tmp_path)
    init_devices: set[str] = set()
    load_devices: set[str] = set()
    for name in ("kaiming_uniform_", "uniform_", "normal_", "ones_", "zeros_"):
        original = getattr(nn.init, name)

        def record(tensor: Tensor, *args: Any, _original: Any = original, **kwargs: Any) -> Tensor:
            init_devices.add(tensor.device.type)
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(nn.init, name, record)
    original_load = nn.Module.load_state_dict

    def load(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        load_devices.update(t.device.type for t in module.state_dict().values())
        return original_load(module, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "load_state_dict", load)
    model = AutoencoderKL.from_pretrained(tmp_path)
    assert init_devices == {"meta"}  # reset_parameters ran on the meta device only: no random weights in memory
    assert load_devices == {"meta"}  # tensors were assigned into an empty module, not copied into a filled one
    assert all(not t.is_meta for t in model.state_dict().values())


class _ToyParams(AbstractParams):
    width: int = 4


class _Frequencies(AbstractComputedBuffers):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.register_computed_buffers()

    def compute_buffers(self, device: torch.device) -> dict[str, Tensor]:
        return {"freqs": torch.arange(self.width, dtype=torch.float32, device=device) / 2}


class _Toy(AbstractModel[_ToyParams]):
    Params = _ToyParams
    diffusers_class_name = "Toy"
    fixed_config: ClassVar[dict[str, object]] = {"norm": "layer"}

    def __init__(self, params: _ToyParams) -> None:
        super().__init__(params)
        self.proj = nn.Linear(params.width, params.width)
        self.pos = _Frequencies(params.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x) + self.pos.freqs


class _ToyWithPlainBuffer(_Toy):
    def __init__(self, params: _ToyParams) -> None:
        super().__init__(params)
        self.register_buffer("table", torch.ones(params.width), persistent=False)


def test_computed_buffers_are_materialised_after_meta_init(tmp_path: Path) -> None:
    toy = _Toy.from_config({"width": 4, "_class_name": "Toy", "_diffusers_version": "0.42.1", "unused": 1})
    toy.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / WEIGHTS)) == {"proj.weight", "proj.bias"}
    loaded = _Toy.from_pretrained(tmp_path)
    assert loaded.pos.freqs.tolist() == [0.0, 0.5, 1.0, 1.5]
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), toy(x))
    with pytest.raises(CheckpointError, match="neither the checkpoint nor the model fills: table"):
        _ToyWithPlainBuffer.from_pretrained(tmp_path)


def test_config_errors(tmp_path: Path) -> None:
    assert _Toy.from_config({"width": 8}).to_config() == {"_class_name": "Toy", "norm": "layer", "width": 8}
    with pytest.raises(ValueError, match="does not support norm='rms'"):
        _Toy.from_config({"norm": "rms"})
    _reference().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is for AutoencoderKL, not Toy"):
        _Toy.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        AutoencoderKL.from_pretrained(tmp_path)
