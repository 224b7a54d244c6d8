"""Flux.1 transformer: parity with diffusers' FluxTransformer2DModel on tiny random weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel as RefFlux
from torch import Tensor

from diffblocks.components.models.flux import (
    FluxParams,
    FluxTransformer2DModel,
    prepare_image_ids,
    prepare_text_ids,
)

TINY: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}
GRID, TXT, BATCH = (4, 3), 5, 2


def _reference(guidance_embeds: bool) -> RefFlux:
    torch.manual_seed(0)
    return RefFlux(**TINY, guidance_embeds=guidance_embeds).eval()


def _inputs(guidance_embeds: bool, dtype: torch.dtype = torch.float32) -> dict[str, Tensor | None]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(BATCH, GRID[0] * GRID[1], 16, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(BATCH, TXT, 32, generator=g).to(dtype),
        "pooled_projections": torch.randn(BATCH, 32, generator=g).to(dtype),
        "timestep": torch.tensor([0.25, 0.8]).to(dtype),
        "img_ids": prepare_image_ids(*GRID, dtype=dtype),
        "txt_ids": prepare_text_ids(TXT, dtype=dtype),
        "guidance": torch.full((BATCH,), 3.5) if guidance_embeds else None,
    }


@torch.no_grad()
def _run_ours(model: FluxTransformer2DModel, inputs: dict[str, Tensor | None]) -> Tensor:
    x = inputs["hidden_states"]
    assert x is not None
    return model(x, **{k: v for k, v in inputs.items() if k != "hidden_states"})  # type: ignore[arg-type]


@torch.no_grad()
def _run_ref(model: RefFlux, inputs: dict[str, Tensor | None]) -> Tensor:
    return model(**inputs, return_dict=False)[0]


def _ours_from(ref: RefFlux) -> FluxTransformer2DModel:
    ours = FluxTransformer2DModel(FluxParams(**TINY, guidance_embeds=ref.config["guidance_embeds"])).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


@pytest.fixture(params=[False, True], ids=["schnell", "dev"])
def guidance_embeds(request: pytest.FixtureRequest) -> bool:
    return request.param


def test_state_dict_keys_and_shapes_equal(guidance_embeds: bool) -> None:
    ref_sd = _reference(guidance_embeds).state_dict()
    ours_sd = FluxTransformer2DModel(FluxParams(**TINY, guidance_embeds=guidance_embeds)).state_dict()
    assert sorted(ours_sd) == sorted(ref_sd)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in ref_sd.items()}


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_forward_matches_diffusers(guidance_embeds: bool, dtype: torch.dtype, atol: float) -> None:
    # Measured on CPU: max |diff| 0.0 in every dtype (same kernels, same op order).
    ref = _reference(guidance_embeds)
    ours = _ours_from(ref)
    inputs = _inputs(guidance_embeds, dtype)
    expected = _run_ref(ref.to(dtype), inputs)
    actual = _run_ours(ours.to(dtype), inputs)
    assert actual.dtype == dtype and actual.shape == (BATCH, GRID[0] * GRID[1], 16)
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= atol, f"max |ours - diffusers| = {diff}"


def test_module_paths_are_diffusers_paths() -> None:
    ref = _reference(True)
    ours = _ours_from(ref)
    ref_names = {name for name, _ in ref.named_modules()}
    ours_names = {name for name, _ in ours.named_modules()}
    assert ours_names <= ref_names, sorted(ours_names - ref_names)
    # Hooks addressed by diffusers paths see the same activations.
    seen: dict[str, list[Tensor]] = {"ours": [], "ref": []}
    for tag, model in (("ours", ours), ("ref", ref)):
        for path in ("transformer_blocks.0", "single_transformer_blocks.1.attn"):
            model.get_submodule(path).register_forward_hook(
                lambda _m, _i, out, tag=tag: seen[tag].extend(out if isinstance(out, tuple) else [out])
            )
    inputs = _inputs(True)
    _run_ref(ref, inputs)
    _run_ours(ours, inputs)
    assert len(seen["ours"]) == len(seen["ref"]) == 3
    for a, b in zip(seen["ours"], seen["ref"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_diffusers_folder_loads_and_ours_saves_for_diffusers(tmp_path: Path, guidance_embeds: bool) -> None:
    ref = _reference(guidance_embeds)
    inputs = _inputs(guidance_embeds)
    expected = _run_ref(ref, inputs)

    ref.save_pretrained(tmp_path / "diffusers")
    ours = FluxTransformer2DModel.from_pretrained(tmp_path / "diffusers")
    assert ours.params == FluxParams(**TINY, guidance_embeds=guidance_embeds)
    torch.testing.assert_close(_run_ours(ours, inputs), expected, atol=1e-6, rtol=0)

    ours.save_pretrained(tmp_path / "ours")
    back = RefFlux.from_pretrained(tmp_path / "ours").eval()
    public = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    # JSON reads the tuple back as a list.
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == {**public, "axes_dims_rope": [4, 6, 6]}
    torch.testing.assert_close(_run_ref(back, inputs), expected, atol=1e-6, rtol=0)


def test_from_pretrained_casts_dtype(tmp_path: Path) -> None:
    ref = _reference(True)
    ref.save_pretrained(tmp_path)
    ours = FluxTransformer2DModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    inputs = _inputs(True, torch.bfloat16)
    expected = _run_ref(ref.to(torch.bfloat16), inputs)
    assert (_run_ours(ours, inputs).float() - expected.float()).abs().max().item() <= 1e-2


def test_guidance_must_match_the_variant() -> None:
    dev = FluxTransformer2DModel(FluxParams(**TINY, guidance_embeds=True))
    schnell = FluxTransformer2DModel(FluxParams(**TINY, guidance_embeds=False))
    with pytest.raises(ValueError, match="pass guidance"):
        _run_ours(dev, {**_inputs(False)})
    with pytest.raises(ValueError, match="guidance=None"):
        _run_ours(schnell, {**_inputs(False), "guidance": torch.full((BATCH,), 3.5)})


def test_batched_ids_are_rejected() -> None:
    model = FluxTransformer2DModel(FluxParams(**TINY))
    inputs = _inputs(False)
    img_ids = inputs["img_ids"]
    assert img_ids is not None
    with pytest.raises(ValueError, match=r"img_ids must be 2-D .* got shape \(1, 12, 3\)"):
        _run_ours(model, {**inputs, "img_ids": img_ids[None]})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"axes_dims_rope": (4, 6, 8)}, r"sum\(axes_dims_rope\) = 18 \(4, 6, 8\) must equal attention_head_dim 16"),
        ({"axes_dims_rope": (3, 7, 6)}, r"positive even number .* got \(3, 7, 6\)"),
        ({"axes_dims_rope": ()}, r"at least one axis"),
        ({"num_attention_heads": 0}, r"num_attention_heads must be >= 1, got 0"),
        ({"out_channels": 0}, r"out_channels must be >= 1, got 0"),
        ({"num_single_layers": -1}, r"num_single_layers must be >= 0, got -1"),
        ({"qk_norm": "rms"}, r"Extra inputs are not permitted"),
    ],
)
def test_params_validation(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FluxParams(**{**TINY, **overrides})


def test_params_read_a_diffusers_config() -> None:
    ref = _reference(True)
    model = FluxTransformer2DModel.from_config(ref.config)
    assert model.params.axes_dims_rope == (4, 6, 6)
    assert model.params.inner_dim == 32 and model.params.resolved_out_channels == 16
    config = model.to_config()
    assert config["_class_name"] == "FluxTransformer2DModel"
    assert config["axes_dims_rope"] == [4, 6, 6]


def test_every_attention_goes_through_the_seam(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffblocks.components import attention as seam
    from diffblocks.components.models.flux import layers

    assert layers.attention is seam.attention
    shapes: list[tuple[int, ...]] = []

    def spy(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> Tensor:
        shapes.append(tuple(q.shape))
        return seam.attention(q, k, v, **kwargs)

    monkeypatch.setattr(layers, "attention", spy)
    _run_ours(FluxTransformer2DModel(FluxParams(**TINY)), _inputs(False))
    # (batch, heads, txt + img tokens, head_dim), once per double and per single block
    assert shapes == [(BATCH, 2, TXT + GRID[0] * GRID[1], 16)] * 3
