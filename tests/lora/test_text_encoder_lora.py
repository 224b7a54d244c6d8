"""Text-encoder LoRAs (SD 1.5, SDXL, Flux) against the update applied by hand to a copy of the encoder.

diffusers cannot load text-encoder LoRAs here (its PEFT integration wants a newer PEFT for
transformers 5), so the reference is ``W + (alpha / rank) * up @ down`` written into a copy of the
transformers model's weights; a whole image compares with diffusers running that copy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from diffblocks.blocks import Pipeline
from tests.lora.lora_files import peft_lora
from tests.presets.flux_fixtures import tiny_flux
from tests.presets.sd_fixtures import tiny_sd15, tiny_sdxl

CLIP_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
T5_LAYERS = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o", "DenseReluDense.wi", "DenseReluDense.wo")
Update = dict[str, tuple[Tensor, Tensor, float]]  # module path -> (down, up, alpha)


def file_names(update: Update, model: nn.Module) -> Update:
    """The update under the names files use: CLIP layers under ``text_model.``, as in checkpoints (transformers 5 drops that level)."""
    if "text_model" in dict(model.named_children()) or "encoder.block.0" in dict(model.named_modules()):
        return update
    return {f"text_model.{name}": value for name, value in update.items()}


def random_update(model: nn.Module, layers: tuple[str, ...], *, seed: int, rank: int = 4, alpha: float = 2.0) -> Update:
    g = torch.Generator().manual_seed(seed)
    found: Update = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(layers):
            down = torch.randn(rank, module.in_features, generator=g) * 0.3
            found[name] = (down, torch.randn(module.out_features, rank, generator=g) * 0.3, alpha)
    assert found
    return found


def peft_keys(update: Update, prefix: str) -> dict[str, Tensor]:
    """diffusers/PEFT: ``prefix + module path``, no alpha (so ``up`` carries ``alpha / rank``)."""
    out: dict[str, Tensor] = {}
    for name, (down, up, alpha) in update.items():
        out[f"{prefix}{name}.lora_A.weight"] = down
        out[f"{prefix}{name}.lora_B.weight"] = up * (alpha / down.shape[0])
    return out


def kohya_keys(update: Update, prefix: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, (down, up, alpha) in update.items():
        flat = prefix + name.replace(".", "_")
        out |= {f"{flat}.lora_down.weight": down.clone(), f"{flat}.lora_up.weight": up.clone(), f"{flat}.alpha": torch.tensor(alpha)}
    return out


def old_diffusers_keys(update: Update, prefix: str) -> dict[str, Tensor]:
    """diffusers' attention-processor layout: ``self_attn.to_q_lora.down`` and ``mlp.fc1.lora_linear_layer.down``."""
    out: dict[str, Tensor] = {}
    old = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}
    for name, (down, up, alpha) in update.items():
        parent, _, leaf = name.rpartition(".")
        base = f"{prefix}{parent}.{old[leaf]}" if leaf in old else f"{prefix}{name}.lora_linear_layer"
        out[f"{base}.down.weight"] = down
        out[f"{base}.up.weight"] = up * (alpha / down.shape[0])
    return out


def merged(model: nn.Module, *updates: tuple[Update, float]) -> nn.Module:
    """A copy of ``model`` with ``W + weight * (alpha / rank) * up @ down`` for each update."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for update, weight in updates:
            for name, (down, up, alpha) in update.items():
                copied.get_submodule(name).weight += weight * (alpha / down.shape[0]) * (up @ down)
    return copied


def embeds(encoder: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return encoder(ids)[0]


def snapshot(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, Tensor]]:
    return dict(model.named_modules()), {k: v.clone() for k, v in model.state_dict().items()}


def restored(model: nn.Module, before: tuple[dict[str, nn.Module], dict[str, Tensor]]) -> bool:
    modules, state = before
    now = model.state_dict()
    return dict(model.named_modules()) == modules and now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


IDS = torch.tensor([[49406, 320, 736, 2138, 49407, 49407]])
KWARGS = dict(prompt="a red circle", negative_prompt="blurry", height=32, width=32, num_inference_steps=3, guidance_scale=6.0)


@pytest.fixture(scope="module")
def sd15_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd15(tmp_path_factory.mktemp("sd15"))


@pytest.mark.parametrize("layout", [peft_keys, kohya_keys, old_diffusers_keys])
def test_sd15_text_encoder_lora_matches_the_update_applied_by_hand(
    sd15_repo: Path, tmp_path: Path, layout: Callable[[Update, str], dict[str, Tensor]]
) -> None:
    pipe = Pipeline.from_pretrained(str(sd15_repo))
    encoder = pipe.components["text_encoder"]
    before = snapshot(encoder)
    update = random_update(encoder, CLIP_LAYERS, seed=1)
    prefix = "lora_te_" if layout is kohya_keys else "text_encoder."
    save_file(layout(file_names(update, encoder), prefix), tmp_path / "te.safetensors")
    reference, half = merged(encoder, (update, 1.0)), merged(encoder, (update, 0.5))
    assert (embeds(reference, IDS) - embeds(encoder, IDS)).abs().max() > 1e-2

    pipe.load_lora_weights(tmp_path / "te.safetensors", adapter_name="te")
    assert (embeds(encoder, IDS) - embeds(reference, IDS)).abs().max() < 1e-5
    pipe.set_adapters("te", 0.5)
    assert (embeds(encoder, IDS) - embeds(half, IDS)).abs().max() < 1e-5
    pipe.fuse_lora()
    assert (embeds(encoder, IDS) - embeds(half, IDS)).abs().max() < 1e-5
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert restored(encoder, before)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
def test_sd15_lora_of_unet_and_text_encoder_gives_diffusers_image(sd15_repo: Path, tmp_path: Path) -> None:
    import diffusers
    from diffusers import UNet2DConditionModel

    ours = Pipeline.from_pretrained(str(sd15_repo))
    encoder, unet = ours.components["text_encoder"], ours.components["unet"]
    before = snapshot(encoder), snapshot(unet)
    unet_file = peft_lora(UNet2DConditionModel.from_pretrained(sd15_repo / "unet"), tmp_path / "unet", seed=1)
    a, b = random_update(encoder, CLIP_LAYERS, seed=2), random_update(encoder, CLIP_LAYERS, seed=3, rank=2, alpha=1.0)
    save_file({**load_file(unet_file), **peft_keys(file_names(a, encoder), "text_encoder.")}, tmp_path / "a.safetensors")
    save_file(kohya_keys(file_names(b, encoder), "lora_te_"), tmp_path / "b.safetensors")

    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd15_repo, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(unet_file.parent, adapter_name="a")  # the UNet part, which diffusers reads
    plain_encoder = ref.text_encoder

    def images(pipe: Any, **extra: Any) -> np.ndarray:
        return pipe(**KWARGS, generator=torch.Generator().manual_seed(7), output_type="np", **extra).images

    ref.text_encoder = merged(plain_encoder, (a, 1.0))
    ours.load_lora_weights(tmp_path / "a.safetensors", adapter_name="a")
    assert np.abs(images(ours, progress=False) - images(ref)).max() < 1e-5

    # two adapters at (0.7, 0.4): b updates only the text encoder, so the UNet runs a at 0.7
    ours.load_lora_weights(tmp_path / "b.safetensors", adapter_name="b")
    assert ours.get_active_adapters() == ["b"]
    ours.set_adapters(["a", "b"], [0.7, 0.4])
    ref.set_adapters("a", 0.7)
    ref.text_encoder = merged(plain_encoder, (a, 0.7), (b, 0.4))
    expected = images(ref)
    assert np.abs(images(ours, progress=False) - expected).max() < 1e-5
    ours.fuse_lora()
    assert np.abs(images(ours, progress=False) - expected).max() < 1e-4
    ours.unfuse_lora()
    ours.delete_adapters("b")
    assert ours.get_active_adapters() == ["a"]
    ours.unload_lora_weights()
    assert restored(encoder, before[0]) and restored(unet, before[1])


def test_sdxl_kohya_lora_of_both_text_encoders_gives_diffusers_image(tmp_path: Path) -> None:
    import diffusers

    repo = tiny_sdxl(tmp_path / "sdxl")
    ours = Pipeline.from_pretrained(str(repo))
    first, second = ours.components["text_encoder"], ours.components["text_encoder_2"]
    before = snapshot(first), snapshot(second)
    one, two = random_update(first, CLIP_LAYERS, seed=1), random_update(second, CLIP_LAYERS, seed=2, rank=2)
    one_, two_ = file_names(one, first), file_names(two, second)
    save_file({**kohya_keys(one_, "lora_te1_"), **kohya_keys(two_, "lora_te2_")}, tmp_path / "kohya.safetensors")
    save_file({**peft_keys(one_, "text_encoder."), **peft_keys(two_, "text_encoder_2.")}, tmp_path / "peft.safetensors")

    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(repo, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    ref.text_encoder, ref.text_encoder_2 = merged(first, (one, 1.0)), merged(second, (two, 1.0))
    kwargs = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=3, height=32, width=32)
    expected = ref(**kwargs, generator=torch.Generator().manual_seed(7), output_type="np").images
    plain = ours(**kwargs, generator=torch.Generator().manual_seed(7), output_type="np", progress=False).images
    assert np.abs(plain - expected).max() > 1e-3
    for name in ("kohya", "peft"):
        ours.load_lora_weights(tmp_path / f"{name}.safetensors", adapter_name=name)
        out = ours(**kwargs, generator=torch.Generator().manual_seed(7), output_type="np", progress=False).images
        assert np.abs(out - expected).max() < 1e-5, name
        ours.unload_lora_weights()
    assert restored(first, before[0]) and restored(second, before[1])


def test_flux_kohya_and_comfy_loras_of_clip_and_t5_give_diffusers_image(tmp_path: Path) -> None:
    import diffusers

    repo = tiny_flux(tmp_path / "flux")
    ours = Pipeline.from_pretrained(str(repo))
    clip, t5 = ours.components["text_encoder"], ours.components["text_encoder_2"]
    before = snapshot(clip), snapshot(t5)
    one, two = random_update(clip, CLIP_LAYERS, seed=1), random_update(t5, T5_LAYERS, seed=2)
    t5_ids = torch.tensor([[37, 1008, 1]])
    references = merged(clip, (one, 1.0)), merged(t5, (two, 1.0))
    ref = diffusers.FluxPipeline.from_pretrained(repo)
    ref.set_progress_bar_config(disable=True)
    ref.text_encoder, ref.text_encoder_2 = references
    kwargs = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=16)
    expected = ref(**kwargs, generator=torch.Generator().manual_seed(7), output_type="np").images
    plain = ours(**kwargs, generator=torch.Generator().manual_seed(7), output_type="np", progress=False).images
    assert np.abs(plain - expected).max() > 1e-3
    for name, tensors in {
        "kohya": {**kohya_keys(file_names(one, clip), "lora_te1_"), **kohya_keys(two, "lora_te3_")},  # sd-scripts' lora_flux
        "comfy": {**_comfy(file_names(one, clip), "text_encoders.clip_l.transformer."), **_comfy(two, "text_encoders.t5xxl.transformer.")},
    }.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
        ours.load_lora_weights(tmp_path / f"{name}.safetensors", adapter_name=name)
        assert (embeds(clip, IDS) - embeds(references[0], IDS)).abs().max() < 1e-5
        assert (embeds(t5, t5_ids) - embeds(references[1], t5_ids)).abs().max() < 1e-5
        out = ours(**kwargs, generator=torch.Generator().manual_seed(7), output_type="np", progress=False).images
        assert np.abs(out - expected).max() < 1e-5, name
        ours.unload_lora_weights()
        assert restored(clip, before[0]) and restored(t5, before[1])


def _comfy(update: Update, prefix: str) -> dict[str, Tensor]:
    """ComfyUI's layout: the module path with its dots, kohya's parts."""
    out: dict[str, Tensor] = {}
    for name, (down, up, alpha) in update.items():
        out |= {f"{prefix}{name}.lora_down.weight": down, f"{prefix}{name}.lora_up.weight": up, f"{prefix}{name}.alpha": torch.tensor(alpha)}
    return out


def test_bad_text_encoder_loras_change_nothing(sd15_repo: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    pipe = Pipeline.from_pretrained(str(sd15_repo))
    encoder, unet = pipe.components["text_encoder"], pipe.components["unet"]
    before = snapshot(encoder), snapshot(unet)
    update = random_update(encoder, CLIP_LAYERS, seed=1)
    # an SDXL file: its second encoder's keys have no model here
    save_file({**kohya_keys(update, "lora_te1_"), **kohya_keys(update, "lora_te2_")}, tmp_path / "sdxl.safetensors")
    with pytest.raises(ValueError, match=r"\d+ key\(s\) of this LoRA file are for text_encoder_2, which this pipeline has none of"):
        pipe.load_lora_weights(tmp_path / "sdxl.safetensors")
    # an encoder of another width, beside a UNet part that fits: nothing is attached anywhere
    wide = {name: (torch.zeros(4, 48), torch.zeros(up.shape[0], 4), 4.0) for name, (_, up, _) in update.items()}
    unet_file = peft_lora(UNet2DConditionModel.from_pretrained(sd15_repo / "unet"), tmp_path / "unet", seed=1)
    save_file({**load_file(unet_file), **kohya_keys(file_names(wide, encoder), "lora_te_")}, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match=r"CLIPTextModel: layer '(text_model\.)?encoder\.layers\.\d\.\S+' has weight \(\d+, \d+\), but .* \(\d+, 48\)"):
        pipe.load_lora_weights(tmp_path / "wide.safetensors")
    # a key that names no layer of the encoder
    save_file({"lora_te_text_model_encoder_layers_9_mlp_fc1.lora_down.weight": torch.zeros(4, 32)}, tmp_path / "deep.safetensors")
    with pytest.raises(ValueError, match=r"1 key\(s\) of this LoRA file match no layer of CLIPTextModel: lora_te_text_model_encoder_layers_9"):
        pipe.load_lora_weights(tmp_path / "deep.safetensors")
    assert restored(encoder, before[0]) and restored(unet, before[1]) and pipe.get_active_adapters() == []


def test_disable_enable_and_hotswap_reach_the_text_encoder(sd15_repo: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    pipe = Pipeline.from_pretrained(str(sd15_repo))
    encoder = pipe.components["text_encoder"]
    plain = embeds(encoder, IDS)
    one, two = random_update(encoder, CLIP_LAYERS, seed=1), random_update(encoder, CLIP_LAYERS, seed=2, alpha=4.0)
    first, second = merged(encoder, (one, 1.0)), merged(encoder, (two, 1.0))
    save_file(kohya_keys(file_names(one, encoder), "lora_te_"), tmp_path / "one.safetensors")
    save_file(peft_keys(file_names(two, encoder), "text_encoder."), tmp_path / "two.safetensors")
    pipe.load_lora_weights(tmp_path / "one.safetensors", adapter_name="style")

    pipe.disable_lora()
    assert torch.equal(embeds(encoder, IDS), plain)
    with pytest.raises(ValueError, match="adapters are disabled; enable them before fusing"):
        pipe.fuse_lora()
    pipe.enable_lora()
    assert (embeds(encoder, IDS) - embeds(first, IDS)).abs().max() < 1e-5

    # another adapter of the same ranks, in another layout and scale, swapped in place
    pipe.load_lora_weights(tmp_path / "two.safetensors", adapter_name="style", hotswap=True)
    assert (embeds(encoder, IDS) - embeds(second, IDS)).abs().max() < 1e-5
    unet_file = peft_lora(UNet2DConditionModel.from_pretrained(sd15_repo / "unet"), tmp_path / "unet", seed=1)
    with pytest.raises(ValueError, match=r"'style' cannot be replaced in place: it is attached to \['text_encoder'\], the new file updates \['denoiser'\]"):
        pipe.load_lora_weights(unet_file, adapter_name="style", hotswap=True)
    pipe.fuse_lora()
    with pytest.raises(ValueError, match="is fused; unfuse it before disabling its LoRA adapters"):
        pipe.disable_lora()
    assert (embeds(encoder, IDS) - embeds(second, IDS)).abs().max() < 1e-5
