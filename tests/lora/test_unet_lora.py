"""LoRA on the UNet: parity with diffusers' load_lora_adapter / set_adapters / fuse_lora, and exact restores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel as RefUNet
from torch import Tensor

from diffblocks.components.lora import LoRA, LoRAWeights, adapter_names, eject, fuse, inject, set_weights, unfuse
from diffblocks.components.models.unet import UNet2DConditionModel
from tests.lora.lora_files import SD15, SDXL, kohya_from_peft, peft_lora, save_unet

TOL = 1e-5


def _inputs(config: dict[str, Any]) -> tuple[tuple[Tensor, Tensor, Tensor], dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 7, 32, generator=g))
    extra: dict[str, Any] = {}
    if "addition_embed_type" in config:
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 24, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    return args, extra


@torch.no_grad()
def _run(model: torch.nn.Module, config: dict[str, Any]) -> Tensor:
    args, extra = _inputs(config)
    out = model(*args, **extra)
    return out.sample if hasattr(out, "sample") else out


def _pair(config: dict[str, Any], tmp_path: Path) -> tuple[RefUNet, UNet2DConditionModel]:
    save_unet(config, tmp_path / "unet")
    return RefUNet.from_pretrained(tmp_path / "unet").eval(), UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()


@pytest.mark.parametrize("config", [SD15, SDXL], ids=["sd15", "sdxl"])
def test_peft_and_kohya_files_match_diffusers(config: dict[str, Any], tmp_path: Path) -> None:
    ref, ours = _pair(config, tmp_path)
    peft_file = peft_lora(config, tmp_path / "a", seed=1)
    kohya_file = kohya_from_peft(peft_file, tmp_path / "a_kohya.safetensors", alpha=2.0)
    ref.load_lora_adapter(str(peft_file), prefix="unet", adapter_name="a")
    expected = _run(ref, config)
    before = _run(ours, config)
    assert (expected - before).abs().max() > 1e-3  # the LoRA changes the output

    for path in (peft_file, kohya_file):
        lora = LoRA.from_file(path, ours, name="a")
        assert len(lora.layers) > 10 and any(ours.get_submodule(n).weight.ndim == 4 for n in lora.layers)  # LoCon too
        inject(ours, lora)
        torch.testing.assert_close(_run(ours, config), expected, atol=TOL, rtol=0)
        eject(ours, "a")
        assert torch.equal(_run(ours, config), before)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # peft's note on a second adapter
def test_two_adapters_weighted_and_fused_match_diffusers(tmp_path: Path) -> None:
    ref, ours = _pair(SD15, tmp_path)
    files = {name: peft_lora(SD15, tmp_path / name, seed=seed) for name, seed in (("a", 1), ("b", 2))}
    for name, path in files.items():
        ref.load_lora_adapter(str(path), prefix="unet", adapter_name=name)
        inject(ours, LoRA.from_file(path, ours, name=name))
    ref.set_adapters(["a", "b"], [0.7, 0.4])
    set_weights(ours, {"a": 0.7, "b": 0.4})
    assert adapter_names(ours) == ["a", "b"]
    expected = _run(ref, SD15)
    torch.testing.assert_close(_run(ours, SD15), expected, atol=TOL, rtol=0)

    ref.fuse_lora(adapter_names=["a", "b"])
    fuse(ours)
    torch.testing.assert_close(_run(ours, SD15), _run(ref, SD15), atol=TOL, rtol=0)
    torch.testing.assert_close(_run(ours, SD15), expected, atol=1e-4, rtol=0)


def test_fuse_unfuse_and_eject_restore_every_weight_bit_for_bit(tmp_path: Path) -> None:
    _, ours = _pair(SD15, tmp_path)
    original = {k: v.clone() for k, v in ours.state_dict().items()}
    modules = dict(ours.named_modules())
    inject(ours, LoRA.from_file(peft_lora(SD15, tmp_path / "a", seed=1), ours, name="a"))
    set_weights(ours, {"a": 0.7})
    fuse(ours)
    unfuse(ours)
    eject(ours, "a")
    assert dict(ours.named_modules()) == modules  # the very module objects are back
    state = ours.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in original)


def test_attached_updates_follow_the_model_to_another_dtype(tmp_path: Path) -> None:
    _, ours = _pair(SD15, tmp_path)
    inject(ours, LoRA.from_file(peft_lora(SD15, tmp_path / "a", seed=1), ours, name="a"))
    expected = _run(ours, SD15)
    ours.double()
    args, _ = _inputs(SD15)
    with torch.no_grad():
        out = ours(*(a.double() if a.is_floating_point() else a for a in args))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), expected, atol=1e-5, rtol=0)


def test_linear_and_1x1_convolution_updates_are_interchangeable() -> None:
    conv, linear = torch.nn.Conv2d(6, 5, 1), torch.nn.Linear(6, 5)
    linear.weight.data = conv.weight.data.flatten(1).clone()
    linear.bias.data = conv.bias.data.clone()
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)
    host_conv, host_linear = torch.nn.Sequential(conv), torch.nn.Sequential(linear)
    inject(host_conv, LoRA("a", {"0": LoRAWeights(down, up, 2.0)}))
    inject(host_linear, LoRA("a", {"0": LoRAWeights(down[:, :, None, None], up[:, :, None, None], 2.0)}))
    x = torch.randn(1, 6, 3, 3, generator=g)
    with torch.no_grad():
        expected = conv(x) + torch.einsum("or,ri,bihw->bohw", up, down, x)
        torch.testing.assert_close(host_conv(x), expected)
        torch.testing.assert_close(host_linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), expected)


def test_set_weights_on_a_partly_fused_model_changes_nothing() -> None:
    # ejecting one adapter of a fused model unfuses the layers it held; the others stay fused, and
    # set_weights must refuse before it changes any layer's weights
    from torch import nn

    from diffblocks.components.lora import adapter_weights, is_fused

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    def lora(name: str, layer: str) -> LoRA:
        return LoRA(name, {layer: LoRAWeights(torch.ones(2, 4), torch.ones(4, 2), alpha=2.0)})

    for name, layer in (("a", "0"), ("c", "0"), ("b", "1")):
        inject(model, lora(name, layer))
    fuse(model)
    eject(model, "a")
    assert is_fused(model)
    before = adapter_weights(model)
    with pytest.raises(ValueError, match="is fused; unfuse it before changing adapter weights"):
        set_weights(model, {"c": 0.5})
    assert adapter_weights(model) == before and model[0].weights == {"c": 1.0}


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_a_model_saved_with_adapters_attached_saves_its_own_weights(fused: bool, tmp_path: Path) -> None:
    # as a pipeline's save does: the model's own names and weights, the adapters kept attached after
    _, ours = _pair(SD15, tmp_path)
    original = {k: v.clone() for k, v in ours.state_dict().items()}
    inject(ours, LoRA.from_file(peft_lora(SD15, tmp_path / "a", seed=1), ours, name="a"))
    if fused:
        fuse(ours)
    before = _run(ours, SD15)
    ours.save_pretrained(tmp_path / "saved")
    assert adapter_names(ours) == ["a"] and torch.equal(_run(ours, SD15), before)
    back = UNet2DConditionModel.from_pretrained(tmp_path / "saved")
    state = back.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in original)
