"""Hot-swapping a LoRA under torch.compile: the new weights, and no recompilation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.components.lora import LoRA, hotswap, inject, set_weights
from diffblocks.components.models.unet import UNet2DConditionModel
from tests.lora.lora_files import SD15, peft_lora, save_unet
from tests.lora.test_unet_lora import _run


def test_hotswap_under_compile_gives_the_new_lora_without_recompiling(tmp_path: Path) -> None:
    save_unet(SD15, tmp_path / "unet")
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    eager = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    a, b = peft_lora(SD15, tmp_path / "a", seed=1), peft_lora(SD15, tmp_path / "b", seed=2)
    inject(ours, LoRA.from_file(a, ours, name="style"))
    set_weights(ours, {"style": 0.7})
    inject(eager, LoRA.from_file(b, eager, name="other"))
    set_weights(eager, {"other": 0.7})

    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="eager")
    first = _run(compiled, SD15)
    new = LoRA.from_file(b, ours, name="other")
    new = LoRA(new.name, {path: type(u)(u.down, u.up * 2.0, alpha=u.alpha / 2.0) for path, u in new.layers.items()})  # same update, another alpha
    hotswap(ours, "style", new)
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = _run(compiled, SD15)
    assert (first - second).abs().max() > 1e-3
    torch.testing.assert_close(second, _run(eager, SD15), atol=1e-5, rtol=0)
    torch._dynamo.reset()


def test_hotswap_refuses_other_layers_or_ranks_and_changes_nothing(tmp_path: Path) -> None:
    save_unet(SD15, tmp_path / "unet")
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    inject(ours, LoRA.from_file(peft_lora(SD15, tmp_path / "a", seed=1), ours, name="style"))
    before = _run(ours, SD15)
    with pytest.raises(ValueError, match=r"at layer '.*' the attached one has down \(4, .*the new one \(8, "):
        hotswap(ours, "style", LoRA.from_file(peft_lora(SD15, tmp_path / "r8", seed=2, rank=8), ours))
    lora = LoRA.from_file(peft_lora(SD15, tmp_path / "b", seed=3), ours)
    with pytest.raises(ValueError, match="they update different layers"):
        hotswap(ours, "style", LoRA("fewer", dict(list(lora.layers.items())[:3])))
    with pytest.raises(KeyError, match="no LoRA named 'nothing'"):
        hotswap(ours, "nothing", lora)
    assert torch.equal(_run(ours, SD15), before)


def test_pipeline_load_lora_weights_hotswap(tmp_path: Path) -> None:
    from tests.presets.sd_fixtures import tiny_sd15

    repo = tiny_sd15(tmp_path / "sd15")
    pipe = Pipeline.from_pretrained(str(repo))
    from diffusers import UNet2DConditionModel as RefUNet

    ref = RefUNet.from_pretrained(repo / "unet")
    a, b = peft_lora(ref, tmp_path / "a", seed=1), peft_lora(ref, tmp_path / "b", seed=2)
    kwargs = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, output_type="pt", progress=False)
    pipe.load_lora_weights(b, adapter_name="b")
    expected = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.unload_lora_weights()
    pipe.load_lora_weights(a, adapter_name="style")
    with pytest.raises(ValueError, match="name it with adapter_name"):
        pipe.load_lora_weights(b, hotswap=True)
    assert pipe.load_lora_weights(b, adapter_name="style", hotswap=True) == "style"
    torch.testing.assert_close(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images, expected, atol=1e-5, rtol=0)


def test_hotswap_leaves_the_attached_lora_value_as_it_was() -> None:
    # a LoRA value is frozen: swapping another in must not write into the tensors it was attached from,
    # or swapping it back (or another model holding it) would get the new weights
    import copy

    from torch import nn

    from diffblocks.components.lora import LoRAWeights

    base = nn.Linear(4, 3)
    model, other, unchanged = (nn.Sequential(copy.deepcopy(base)) for _ in range(3))
    first = LoRA("a", {"0": LoRAWeights(torch.ones(2, 4), torch.ones(3, 2), alpha=2.0)})
    second = LoRA("b", {"0": LoRAWeights(torch.full((2, 4), 5.0), torch.full((3, 2), 7.0), alpha=2.0)})
    inject(model, first)
    inject(other, first)
    x = torch.randn(2, 4)
    before = other(x)
    hotswap(model, "a", second)
    assert torch.equal(first.layers["0"].down, torch.ones(2, 4)) and torch.equal(first.layers["0"].up, torch.ones(3, 2))
    assert torch.equal(other(x), before)
    hotswap(model, "a", first)  # back to the first LoRA's weights
    inject(unchanged, first)
    torch.testing.assert_close(model(x), unchanged(x), atol=0, rtol=0)
