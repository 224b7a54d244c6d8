"""Textual inversion in the diffusers and A1111 layouts: diffusers' images, and the tokenizer and matrix restored exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffblocks.blocks import Pipeline
from diffblocks.components.textual_inversion import Embedding, expand_prompt
from tests.presets.sd_fixtures import tiny_sd15, tiny_sdxl

KWARGS = dict(negative_prompt="blurry", height=32, width=32, num_inference_steps=3, guidance_scale=6.0)


def vectors(count: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def state(tokenizer: Any, encoder: nn.Module) -> tuple[Any, ...]:
    """Everything loading and unloading touches: the tokenizer's serialised form, the matrix's module and values, the config."""
    table = getattr(encoder, "get_input_embeddings")()
    return tokenizer._tokenizer.to_str(), len(tokenizer), table, table.weight.detach().clone(), encoder.config.vocab_size


def same(before: tuple[Any, ...], after: tuple[Any, ...]) -> bool:
    return before[:3] == after[:3] and before[2] is after[2] and torch.equal(before[3], after[3]) and before[4] == after[4]


def images(pipe: Any, prompt: str, **extra: Any) -> np.ndarray:
    return pipe(prompt=prompt, **KWARGS, generator=torch.Generator().manual_seed(7), output_type="np", **extra).images


@pytest.fixture(scope="module")
def sd15_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd15(tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("embeddings")
    (folder / "diffusers").mkdir()
    save_file({"<cat>": vectors(3, 32, 1)}, folder / "diffusers" / "learned_embeds.safetensors")
    save_file({"emb_params": vectors(2, 32, 2)}, folder / "bird-style.safetensors")
    a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors(1, 32, 3)}, "name": "<dog>", "step": 500}
    torch.save(a1111, folder / "dog.pt")
    save_file({"clip_l": vectors(2, 32, 4), "clip_g": vectors(2, 32, 5)}, folder / "xl-style.safetensors")
    return {"diffusers": folder / "diffusers", "a1111": folder / "bird-style.safetensors", "pt": folder / "dog.pt", "xl": folder / "xl-style.safetensors"}


def test_sd15_embeddings_give_diffusers_images_and_unload_restores_exactly(sd15_repo: Path, files: dict[str, Path]) -> None:
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd15_repo, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(str(sd15_repo))
    tokenizer, encoder = ours.components["tokenizer"], ours.components["text_encoder"]
    prompt = "a <cat> next to a bird-style <dog>"
    plain = images(ours, prompt, progress=False)
    before = state(tokenizer, encoder)

    assert ours.load_textual_inversion(files["diffusers"]) == ["<cat>", "<cat>_1", "<cat>_2"]
    assert ours.load_textual_inversion(files["a1111"]) == ["bird-style", "bird-style_1"]  # the token is the file's name
    assert ours.load_textual_inversion(files["pt"], allow_pickle=True) == ["<dog>"]
    assert expand_prompt(prompt, tokenizer) == "a <cat> <cat>_1 <cat>_2 next to a bird-style bird-style_1 <dog>"
    ref.load_textual_inversion(str(files["diffusers"]))
    ref.load_textual_inversion(str(files["a1111"]), token="bird-style")
    ref.load_textual_inversion(str(files["pt"]))
    expected = images(ref, prompt)
    assert np.abs(expected - plain).max() > 1e-3
    assert np.abs(images(ours, prompt, progress=False) - expected).max() < 1e-5

    ours.unload_textual_inversion("bird-style")  # the tokens after it move down, as in diffusers
    ref.unload_textual_inversion(["bird-style", "bird-style_1"])
    assert tokenizer.convert_tokens_to_ids(["<dog>"]) == ref.tokenizer.convert_tokens_to_ids(["<dog>"]) == [49411]
    assert np.abs(images(ours, prompt, progress=False) - images(ref, prompt)).max() < 1e-5
    ours.unload_textual_inversion()
    assert same(before, state(tokenizer, encoder))
    assert np.array_equal(images(ours, prompt, progress=False), plain)


def test_sdxl_clip_l_and_clip_g_pair_gives_diffusers_image(tmp_path: Path, files: dict[str, Path]) -> None:
    import diffusers
    from safetensors.torch import load_file

    repo = tiny_sdxl(tmp_path / "sdxl")
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(repo, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(str(repo))
    pairs = [(ours.components["tokenizer"], ours.components["text_encoder"]), (ours.components["tokenizer_2"], ours.components["text_encoder_2"])]
    prompt = "a <xl> photo of a house"
    call = dict(prompt=prompt, num_inference_steps=3, height=32, width=32, output_type="np")
    plain = ours(**call, generator=torch.Generator().manual_seed(7), progress=False).images  # (a call sets the tokenizers' padding)
    before = [state(*pair) for pair in pairs]

    assert ours.load_textual_inversion(files["xl"], token="<xl>") == ["<xl>", "<xl>_1"]
    pair = load_file(files["xl"])
    ref.load_textual_inversion(pair["clip_l"], token="<xl>", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(pair["clip_g"], token="<xl>", text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    expected = ref(**call, generator=torch.Generator().manual_seed(7)).images
    assert np.abs(expected - plain).max() > 1e-3
    assert np.abs(ours(**call, generator=torch.Generator().manual_seed(7), progress=False).images - expected).max() < 1e-5
    ours.unload_textual_inversion("<xl>")
    assert all(same(b, state(*pair)) for b, pair in zip(before, pairs, strict=True))


def test_bad_embeddings_are_refused_and_change_nothing(sd15_repo: Path, files: dict[str, Path], tmp_path: Path) -> None:
    pipe = Pipeline.from_pretrained(str(sd15_repo))
    tokenizer, encoder = pipe.components["tokenizer"], pipe.components["text_encoder"]
    before = state(tokenizer, encoder)
    assert "cat" in tokenizer.get_vocab()
    with pytest.raises(ValueError, match=r"token 'cat' is already in the vocabulary of text_encoder's tokenizer"):
        pipe.load_textual_inversion(files["diffusers"], token="cat")
    save_file({"<wide>": vectors(1, 48, 1)}, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match=r"'<wide>' has vectors of width 48, but text_encoder \(CLIPTextModel\) embeds tokens in 32"):
        pipe.load_textual_inversion(tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match=r"dog\.pt is a pickle; .*allow_pickle=True"):
        pipe.load_textual_inversion(files["pt"])
    with pytest.raises(ValueError, match=r"has vectors for text_encoder_2, which this pipeline has none of"):
        pipe.load_textual_inversion(files["xl"])
    save_file({"a": vectors(1, 32, 1), "b": vectors(1, 32, 2)}, tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match=r"two\.safetensors is not a textual inversion embedding .*: its keys are \['a', 'b'\]"):
        pipe.load_textual_inversion(tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match="NaN or infinite"):
        Embedding("<nan>", {"text_encoder": torch.full((1, 32), float("nan"))})
    with pytest.raises(KeyError, match=r"no textual inversion token '<cat>' is loaded; loaded: \[\]"):
        pipe.unload_textual_inversion("<cat>")
    assert same(before, state(tokenizer, encoder))

    pipe.load_textual_inversion(files["diffusers"])
    with pytest.raises(ValueError, match=r"token '<cat>' is already in the vocabulary"):
        pipe.load_textual_inversion(files["diffusers"])
    pipe.unload_textual_inversion()
    assert same(before, state(tokenizer, encoder))
