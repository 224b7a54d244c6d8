"""Hot-swapping LoRAs of other ranks into room prepared ahead (zero padding), under torch.compile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.components.lora import LoRA, LoRALayer, LoRASource, LoRAWeights, hotswap, inject, set_weights, source_of
from diffblocks.components.models.unet import UNet2DConditionModel
from tests.lora.lora_files import SD15, peft_lora, save_unet
from tests.lora.test_unet_lora import _run


def test_padding_keeps_the_update() -> None:
    g = torch.Generator().manual_seed(0)
    u = LoRAWeights(torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g), alpha=1.0)
    p = u.padded(6)
    assert (p.rank, p.scale) == (6, u.scale)
    torch.testing.assert_close(p.scale * p.up @ p.down, u.scale * u.up @ u.down, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot be padded down to rank 1"):
        u.padded(1)


def test_hotswap_of_lower_and_equal_ranks_into_a_padded_adapter_does_not_recompile(tmp_path: Path) -> None:
    save_unet(SD15, tmp_path / "unet")
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    files = {rank: peft_lora(SD15, tmp_path / f"r{rank}", seed=rank, rank=rank) for rank in (2, 4, 8)}
    inject(ours, LoRA.from_file(files[4], ours, name="style").padded(8))
    set_weights(ours, {"style": 0.7})

    def expected(rank: int) -> torch.Tensor:
        eager = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
        inject(eager, LoRA.from_file(files[rank], eager, name="x"))
        set_weights(eager, {"x": 0.7})
        return _run(eager, SD15)

    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="eager")
    torch.testing.assert_close(_run(compiled, SD15), expected(4), atol=1e-5, rtol=0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rank in (2, 8):
            hotswap(ours, "style", LoRA.from_file(files[rank], ours))
            torch.testing.assert_close(_run(compiled, SD15), expected(rank), atol=1e-5, rtol=0)
    torch._dynamo.reset()


def test_a_rank_above_the_prepared_one_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    save_unet(SD15, tmp_path / "unet")
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    lora = LoRA.from_file(peft_lora(SD15, tmp_path / "a", seed=1, rank=4), ours, name="style")
    with pytest.raises(ValueError, match="has rank 4 at layer '.*', above the target rank 2"):
        lora.padded(2)
    inject(ours, lora.padded(8))
    before = _run(ours, SD15)
    with pytest.raises(ValueError, match=r"the attached one has down \(8, .*the new one \(16, .*enable_lora_hotswap"):
        hotswap(ours, "style", LoRA.from_file(peft_lora(SD15, tmp_path / "b", seed=2, rank=16), ours))
    assert torch.equal(_run(ours, SD15), before)


def test_pipeline_enable_lora_hotswap(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel as RefUNet

    from tests.presets.sd_fixtures import tiny_sd15

    repo = tiny_sd15(tmp_path / "sd15")
    pipe = Pipeline.from_pretrained(str(repo))
    ref = RefUNet.from_pretrained(repo / "unet")
    a, b = peft_lora(ref, tmp_path / "a", seed=1, rank=2), peft_lora(ref, tmp_path / "b", seed=2, rank=8)
    kwargs = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, output_type="pt", progress=False)
    pipe.load_lora_weights(b, adapter_name="b")
    expected = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.unload_lora_weights()
    with pytest.raises(ValueError, match="target_rank of at least 1"):
        pipe.enable_lora_hotswap(target_rank=0)
    pipe.enable_lora_hotswap(target_rank=8)
    pipe.load_lora_weights(a, adapter_name="style")
    assert {m.updates["style"].rank for m in pipe.components["unet"].modules() if isinstance(m, LoRALayer)} == {8}
    pipe.load_lora_weights(b, adapter_name="style", hotswap=True)
    assert source_of(pipe.components["unet"], "style") == LoRASource.of_file(b)  # what a saved preset records now
    torch.testing.assert_close(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images, expected, atol=1e-5, rtol=0)
