"""LoRA on a quantized base, unfused: torchao, quanto, GGUF and bitsandbytes layers stay quantized and untouched."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffblocks.components.lora import LoRA, LoRAWeights, eject, fuse, inject, set_weights
from diffblocks.components.quantizers import (
    BitsAndBytesQuantizer,
    GGUFLinear,
    QuantoQuantizer,
    TorchAoQuantizer,
    quantize,
)
from tests.quantizers.gguf_files import encode

SIZES = [(128, 256), (256, 128)]  # (in, out) of the two linear layers: bitsandbytes packs in blocks of 64


def _float_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(*SIZES[0]), nn.GELU(), nn.Linear(*SIZES[1]))


def _gguf(model: nn.Sequential) -> nn.Sequential:
    rng = np.random.default_rng(0)
    for index in (0, 2):
        layer = model[index]
        assert isinstance(layer, nn.Linear)
        data = torch.from_numpy(encode("Q8_0", layer.weight.data, rng))
        model[index] = GGUFLinear(
            layer.in_features, layer.out_features, type_name="Q8_0", data=data, bias=layer.bias.data, compute_dtype=torch.float32
        )
    return model


def _dequantized(layer: nn.Module) -> Tensor:
    """The weight a quantized layer computes with, as floats (the reference's weight)."""
    if isinstance(layer, GGUFLinear):
        return layer.dequantized_weight()
    weight = layer.weight
    if weight.dtype == torch.uint8:  # bitsandbytes' packed 4-bit
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.dequantize().float()


BACKENDS: dict[str, tuple[Callable[[], nn.Sequential], float]] = {
    "torchao-int8wo": (lambda: quantize(_float_model(), TorchAoQuantizer("int8wo")), 1e-4),
    "quanto-int8": (lambda: quantize(_float_model(), QuantoQuantizer("int8")), 1e-4),
    "gguf-q8_0": (lambda: _gguf(_float_model()), 1e-5),
    "bnb-nf4": (lambda: quantize(_float_model(), BitsAndBytesQuantizer("nf4")), 1e-4),
}


def _lora(seed: int) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    layers = {
        str(index): LoRAWeights(torch.randn(4, n_in, generator=g) * 0.1, torch.randn(n_out, 4, generator=g) * 0.1, alpha=2.0)
        for index, (n_in, n_out) in zip((0, 2), SIZES, strict=True)
    }
    return LoRA("style", layers)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_unfused_lora_on_a_quantized_base_matches_the_dequantized_reference(backend: str) -> None:
    build, tolerance = BACKENDS[backend]
    model = build()
    layers = [model[0], model[2]]
    weights = [layer.weight for layer in layers]
    before = [_dequantized(layer).clone() for layer in layers]
    x = torch.randn(3, SIZES[0][0], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = model(x)
    lora = _lora(1)
    inject(model, lora)
    set_weights(model, {"style": 0.8})
    with torch.no_grad():
        out = model(x)

    def reference_layer(h: Tensor, index: int, weight: Tensor) -> Tensor:
        bias, u = layers[index].bias, lora.layers[str(2 * index)]
        return F.linear(h, weight, bias.float()) + 0.8 * u.scale * (h @ u.down.T @ u.up.T)

    with torch.no_grad():
        reference = reference_layer(F.gelu(reference_layer(x, 0, before[0])), 1, before[1])
    assert (out - plain).abs().max() > 10 * tolerance
    torch.testing.assert_close(out, reference, atol=tolerance, rtol=tolerance)

    with pytest.raises(ValueError, match="quantized.* cannot take a fused LoRA: .*Keep the LoRA unfused"):
        fuse(model)
    eject(model, "style")
    assert [model[0], model[2]] == layers and [layer.weight for layer in layers] == weights  # the very objects
    assert all(torch.equal(_dequantized(layer), b) for layer, b in zip(layers, before, strict=True))
    with torch.no_grad():
        assert torch.equal(model(x), plain)


def test_a_lora_file_on_a_gguf_flux_matches_the_dequantized_model(tmp_path: Path) -> None:
    """A real model read from a GGUF file: every targeted layer is a GGUFLinear, placed by the same tables."""
    from diffusers import FluxTransformer2DModel as DiffusersFlux

    from diffblocks.components.models.flux import FluxParams, FluxTransformer2DModel
    from diffblocks.components.models.gguf import load_gguf
    from diffblocks.components.quantizers import GGUFQuantizer
    from tests.lora.lora_files import flux_peft_lora
    from tests.quantizers.gguf_files import stored, write_gguf
    from tests.quantizers.test_gguf import CONFIG, _inputs

    torch.manual_seed(0)
    ref = DiffusersFlux(**CONFIG).eval()
    path = write_gguf(tmp_path / "flux.gguf", stored(ref.state_dict(), "Q8_0"))
    quantized = load_gguf(path, FluxTransformer2DModel, config=ref.config, quantizer=GGUFQuantizer(torch.float32))
    dequantized = FluxTransformer2DModel(FluxParams(**CONFIG)).eval()
    state = dict(quantized.state_dict())
    for name, module in quantized.named_modules():
        if isinstance(module, GGUFLinear):
            state[f"{name}.weight"] = module.dequantized_weight()
    dequantized.load_state_dict(state, strict=True)
    lora_file = flux_peft_lora(ref, tmp_path / "lora", seed=1)
    for model in (quantized, dequantized):
        inject(model, LoRA.from_file(lora_file, model, name="style"))
        set_weights(model, {"style": 0.7})
    layer = quantized.transformer_blocks[0].attn.to_q
    assert isinstance(layer.base, GGUFLinear) and layer.base.weight.dtype == torch.uint8  # still quantized
    with torch.no_grad():
        out, expected = quantized(**_inputs()), dequantized(**_inputs())
    torch.testing.assert_close(out, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)
