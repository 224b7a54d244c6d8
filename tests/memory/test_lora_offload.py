"""A LoRA attached to a placed model moves with its layers under every offload policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.components import ComponentsManager
from diffblocks.components.lora import LoRA, LoRAWeights, eject, inject
from diffblocks.components.memory import DiskOffload, GroupOffload, LeafOffload, ModelOffload
from diffblocks.components.memory.policies import AbstractOffload
from tests.memory.test_policies import Toy


def _lora(name: str, *paths: str) -> LoRA:
    torch.manual_seed(0)
    return LoRA(name, {path: LoRAWeights(torch.randn(2, 4), torch.randn(4, 2), alpha=2.0) for path in paths})


def _bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# without prefetching, every run moves the same groups: in, then home
@pytest.mark.parametrize("policy", [ModelOffload(), GroupOffload(1, prefetch=False), LeafOffload()], ids=repr)
def test_the_tensors_a_lora_adds_move_with_the_model_and_leave_with_it(policy: AbstractOffload) -> None:
    moved: list[int] = []
    manager = ComponentsManager(device="cpu", offload=policy, on_move=lambda _name, _device, size: moved.append(size))
    key = manager.add("toy", Toy())
    toy = manager.get(key)  # placed: the policy is installed
    x = torch.ones(1, 4)
    toy(x)
    moved.clear()
    toy(x)
    before = sum(moved)
    inject(toy, _lora("style", "blocks.0.0", "blocks.2.1", "embed"))
    lora = _bytes([b for name, b in toy.named_buffers() if "lora_" in name])
    assert lora == 3 * (2 * 4 + 4 * 2) * 4
    moved.clear()
    toy(x)
    toy(x)  # the second run: what every run moves from now on
    moved.clear()
    toy(x)
    layer = lora // 3
    if isinstance(policy, ModelOffload):  # the model stays on the device between its runs: the LoRA came in with it, once
        assert sum(moved) == 0
    elif isinstance(policy, GroupOffload):  # in and home with their groups every run; the embedding's stays on the device
        assert sum(moved) == before + 2 * 2 * layer
    else:  # every layer's own tensors stream: the three LoRA layers' too
        assert sum(moved) == before + 2 * lora
    eject(toy, "style")
    assert not any("lora_" in name for name, _ in toy.named_buffers())
    moved.clear()
    toy(x)
    toy(x)
    moved.clear()
    toy(x)
    assert sum(moved) == (0 if isinstance(policy, ModelOffload) else before)


@pytest.mark.parametrize("policy", [ModelOffload(), GroupOffload(1), DiskOffload(1)], ids=repr)
def test_a_pipeline_with_a_lora_under_a_policy_makes_the_image_it_makes_without(tmp_path: Path, policy: AbstractOffload) -> None:
    from diffusers import UNet2DConditionModel as RefUNet

    from tests.lora.lora_files import peft_lora
    from tests.presets.sd_fixtures import tiny_sd15

    repo = tiny_sd15(tmp_path / "sd15")
    lora = peft_lora(RefUNet.from_pretrained(repo / "unet"), tmp_path / "lora", seed=1)
    kwargs = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, output_type="pt", progress=False)
    plain = Pipeline.from_pretrained(str(repo))
    plain.load_lora_weights(lora, adapter_name="style")
    expected = plain(**kwargs, generator=torch.Generator().manual_seed(0)).images
    placed = Pipeline.from_pretrained(str(repo), manager=ComponentsManager(device="cpu", offload=policy))
    placed(**kwargs, generator=torch.Generator().manual_seed(0))  # the models placed before the LoRA comes
    placed.load_lora_weights(lora, adapter_name="style")
    assert torch.equal(placed(**kwargs, generator=torch.Generator().manual_seed(0)).images, expected)


def test_a_lora_fused_under_group_offload_changes_the_streamed_weights_and_unfuses_bit_for_bit(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel as RefUNet

    from tests.lora.lora_files import peft_lora
    from tests.presets.sd_fixtures import tiny_sd15

    repo = tiny_sd15(tmp_path / "sd15")
    lora = peft_lora(RefUNet.from_pretrained(repo / "unet"), tmp_path / "lora", seed=1)
    kwargs = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, output_type="pt", progress=False)
    plain = Pipeline.from_pretrained(str(repo))
    without = plain(**kwargs, generator=torch.Generator().manual_seed(0)).images
    plain.load_lora_weights(lora, adapter_name="style")
    plain.fuse_lora()
    fused = plain(**kwargs, generator=torch.Generator().manual_seed(0)).images
    placed = Pipeline.from_pretrained(str(repo), manager=ComponentsManager(device="cpu", offload=GroupOffload(1)))
    placed(**kwargs, generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in placed.components["unet"].state_dict().items()}
    placed.load_lora_weights(lora, adapter_name="style")
    placed.fuse_lora()
    assert torch.equal(placed(**kwargs, generator=torch.Generator().manual_seed(0)).images, fused)
    placed.unfuse_lora()
    placed.unload_lora_weights()
    assert all(torch.equal(v, state[k]) for k, v in placed.components["unet"].state_dict().items())
    assert torch.equal(placed(**kwargs, generator=torch.Generator().manual_seed(0)).images, without)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: tensors left at home fail there, not on the CPU")
@pytest.mark.parametrize("policy", [ModelOffload(), GroupOffload(1), LeafOffload()], ids=repr)
def test_on_cuda_a_lora_loaded_after_placement_runs_on_the_device(tmp_path: Path, policy: AbstractOffload) -> None:
    from diffusers import UNet2DConditionModel as RefUNet

    from tests.lora.lora_files import peft_lora
    from tests.presets.sd_fixtures import tiny_sd15

    repo = tiny_sd15(tmp_path / "sd15")
    lora = peft_lora(RefUNet.from_pretrained(repo / "unet"), tmp_path / "lora", seed=1)
    kwargs = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, output_type="pt", progress=False)
    plain = Pipeline.from_pretrained(str(repo), manager=ComponentsManager(device="cuda"))
    plain.load_lora_weights(lora, adapter_name="style")
    expected = plain(**kwargs, generator=torch.Generator().manual_seed(0)).images
    placed = Pipeline.from_pretrained(str(repo), manager=ComponentsManager(device="cuda", offload=policy))
    placed(**kwargs, generator=torch.Generator().manual_seed(0))  # placed, and (group offload) the order learned
    placed.load_lora_weights(lora, adapter_name="style")
    for _ in range(2):
        torch.testing.assert_close(placed(**kwargs, generator=torch.Generator().manual_seed(0)).images, expected, atol=1e-5, rtol=0)
