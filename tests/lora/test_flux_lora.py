"""LoRA on the Flux transformer: a diffusers/PEFT file gives diffusers' output, and ejects exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffblocks.components.lora import LoRA, eject, fuse, inject, set_weights, unfuse
from tests.lora.lora_files import flux_peft_lora
from tests.models.test_flux import _inputs, _ours_from, _reference, _run_ours, _run_ref


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # peft's note on a second adapter
def test_flux_peft_lora_matches_diffusers_weighted_and_fused(tmp_path: Path) -> None:
    ref = _reference(True)
    ours = _ours_from(ref)
    inputs = _inputs(True)
    before = _run_ours(ours, inputs)
    original = {k: v.clone() for k, v in ours.state_dict().items()}
    for name, seed in (("a", 1), ("b", 2)):
        path = flux_peft_lora(ref, tmp_path / name, seed=seed)
        ref.load_lora_adapter(str(path), prefix="transformer", adapter_name=name)
        lora = LoRA.from_file(path, ours, name=name)
        assert any(n.startswith("single_transformer_blocks") for n in lora.layers)
        inject(ours, lora)
    ref.set_adapters(["a", "b"], [0.7, 0.4])
    set_weights(ours, {"a": 0.7, "b": 0.4})
    expected = _run_ref(ref, inputs)
    assert (expected - before).abs().max() > 1e-3
    torch.testing.assert_close(_run_ours(ours, inputs), expected, atol=1e-5, rtol=0)

    fuse(ours)
    torch.testing.assert_close(_run_ours(ours, inputs), expected, atol=1e-4, rtol=0)
    unfuse(ours)
    eject(ours, "a")
    eject(ours, "b")
    assert torch.equal(_run_ours(ours, inputs), before)
    assert all(torch.equal(v, original[k]) for k, v in ours.state_dict().items())
