"""pipe.quantize reloads a component: one that holds LoRA adapters or textual inversion rows is refused, nothing changed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffblocks.blocks import Pipeline
from diffblocks.components.quantizers import TorchAoQuantizer, quantizer_of
from tests.lora.lora_files import peft_lora
from tests.presets.sd_fixtures import tiny_sd15

KWARGS = dict(prompt="a <cat> by a red circle", height=32, width=32, num_inference_steps=2, output_type="pt", progress=False)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd15(tmp_path_factory.mktemp("sd15"))


def _image(pipe: Pipeline) -> torch.Tensor:
    return pipe(**KWARGS, generator=torch.Generator().manual_seed(0)).images


def test_quantize_refuses_a_text_encoder_holding_textual_inversion_rows(repo: Path, tmp_path: Path) -> None:
    pytest.importorskip("torchao")
    pipe = Pipeline.from_pretrained(str(repo))
    save_file({"<cat>": torch.randn(2, 32, generator=torch.Generator().manual_seed(1))}, tmp_path / "cat.safetensors")
    pipe.load_textual_inversion(tmp_path / "cat.safetensors")
    before = _image(pipe)
    encoder = pipe.components["text_encoder"]
    with pytest.raises(ValueError, match=r"'text_encoder' holds the textual inversion token\(s\) \['<cat>'\].*unload_textual_inversion"):
        pipe.quantize({"text_encoder": TorchAoQuantizer("int8wo")})
    assert pipe.components["text_encoder"] is encoder and quantizer_of(encoder) is None
    torch.testing.assert_close(_image(pipe), before, atol=0, rtol=0)
    pipe.unload_textual_inversion()
    pipe.quantize({"text_encoder": TorchAoQuantizer("int8wo")})  # the way the message gives
    pipe.load_textual_inversion(tmp_path / "cat.safetensors")
    assert _image(pipe).isfinite().all()


def test_quantize_refuses_a_denoiser_holding_lora_adapters(repo: Path, tmp_path: Path) -> None:
    pytest.importorskip("torchao")
    from diffusers import UNet2DConditionModel as RefUNet

    pipe = Pipeline.from_pretrained(str(repo))
    pipe.load_lora_weights(peft_lora(RefUNet.from_pretrained(repo / "unet"), tmp_path / "lora", seed=1), adapter_name="style")
    unet = pipe.components["unet"]
    with pytest.raises(ValueError, match=r"'unet' holds the LoRA adapter\(s\) \['style'\].*delete_adapters"):
        pipe.quantize(TorchAoQuantizer("int8wo"))
    assert pipe.components["unet"] is unet and pipe.get_active_adapters() == ["style"]
