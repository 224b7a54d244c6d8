"""XLabs' Flux LoRA layout: the same file gives diffusers' ``load_lora_weights`` output, and bad keys are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffblocks.components.lora import LoRA, eject, inject
from tests.models.test_flux import TINY, _inputs, _ours_from, _reference, _run_ours, _run_ref


def xlabs_lora(path: Path, *, seed: int, rank: int = 4, prefix: str = "", single: bool = True) -> Path:
    """A random LoRA in XLabs' processor layout for the tiny Flux config (double blocks, and single blocks if asked)."""
    dim = TINY["num_attention_heads"] * TINY["attention_head_dim"]
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, int]] = {}  # layer -> (in, out)
    for n in range(TINY["num_layers"]):
        for i in ("1", "2"):
            shapes[f"double_blocks.{n}.processor.qkv_lora{i}"] = (dim, 3 * dim)
            shapes[f"double_blocks.{n}.processor.proj_lora{i}"] = (dim, dim)
    for n in range(TINY["num_single_layers"] if single else 0):
        shapes[f"single_blocks.{n}.processor.qkv_lora"] = (dim, 3 * dim)
        shapes[f"single_blocks.{n}.processor.proj_lora"] = (dim + 4 * dim, dim)  # attention and MLP outputs, concatenated
    tensors = {}
    for layer, (n_in, n_out) in shapes.items():
        tensors[f"{prefix}{layer}.down.weight"] = torch.randn(rank, n_in, generator=g) * 0.3
        tensors[f"{prefix}{layer}.up.weight"] = torch.randn(n_out, rank, generator=g) * 0.3
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("prefix", ["", "diffusion_model."], ids=["bare", "diffusion_model"])
def test_xlabs_lora_matches_diffusers(prefix: str, tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    ref = _reference(True)
    ours = _ours_from(ref)
    inputs = _inputs(True)
    before = _run_ours(ours, inputs)
    path = xlabs_lora(tmp_path / "xlabs.safetensors", seed=1, prefix=prefix)
    pipe = FluxPipeline(None, None, None, None, None, None, ref)  # the transformer alone: what the LoRA updates
    pipe.load_lora_weights(str(path), adapter_name="x")  # diffusers converts XLabs files itself
    lora = LoRA.from_file(path, ours, name="x")
    assert {p.split(".")[0] for p in lora.layers} == {"transformer_blocks", "single_transformer_blocks"}
    inject(ours, lora)
    expected = _run_ref(ref, inputs)
    assert (expected - before).abs().max() > 1e-3
    torch.testing.assert_close(_run_ours(ours, inputs), expected, atol=1e-5, rtol=0)
    eject(ours, "x")
    assert torch.equal(_run_ours(ours, inputs), before)


def test_xlabs_keys_of_no_layer_are_named(tmp_path: Path) -> None:
    ours = _ours_from(_reference(True))
    path = xlabs_lora(tmp_path / "xlabs.safetensors", seed=1, single=False)
    tensors = load_file(path)
    tensors["double_blocks.7.processor.qkv_lora1.down.weight"] = tensors["double_blocks.0.processor.qkv_lora1.down.weight"].clone()
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"1 key\(s\) of this LoRA file match no layer of FluxTransformer2DModel: .*double_blocks\.7"):
        LoRA.from_file(tmp_path / "bad.safetensors", ours)
