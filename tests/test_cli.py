"""The command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffblocks import default_device
from diffblocks.cli import main


def test_env_prints_versions_and_passes_self_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("diffblocks 0.1.0 on Python")
    assert "torch" in out and "self-check: ok (plan, validation, loop, components)" in out


def test_env_fails_when_the_attention_backend_variable_is_garbage(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DIFFBLOCKS_ATTENTION_BACKEND", "garbage")
    assert main(["env"]) == 1
    out = capsys.readouterr().out
    assert "attention        FAILED: environment variable DIFFBLOCKS_ATTENTION_BACKEND: unknown attention backend 'garbage'" in out
    assert "self-check: FAILED" in out


def test_generate_refuses_to_write_images_from_non_finite_latents() -> None:
    import torch

    from diffblocks.cli import CommandError, _check_finite

    with pytest.raises(CommandError, match="the run produced NaN or infinite latents, so every image would be black"):
        _check_finite({"latents": torch.tensor([0.0, float("nan")])})
    _check_finite({"latents": torch.zeros(2)})


def test_unknown_command_exits_with_usage() -> None:
    with pytest.raises(SystemExit) as info:
        main(["paint"])
    assert info.value.code == 2


# --- generate ------------------------------------------------------------------------------------------------

FAST = ["--steps", "2", "--no-progress"]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def test_generate_writes_an_image_with_the_builtin_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.png"
    assert main(["generate", "a red circle above a blue square", "-o", str(out), *FAST]) == 0
    assert _size(out) == (64, 64)
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "1 image in" in printed and "(text2img)" in printed
    assert printed.startswith(f"device: {default_device()} (the first found of cuda, npu, xpu, mps, cpu")


def test_generate_numbers_extra_images_and_seeds_them_one_by_one(tmp_path: Path) -> None:
    out = tmp_path / "many.png"
    assert main(["generate", "a green ring", "-o", str(out), "--num-images", "3", "--seed", "5", *FAST]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many-1.png", "many-2.png", "many.png"]
    single = tmp_path / "single" / "one.png"
    assert main(["generate", "a green ring", "-o", str(single), "--seed", "6", *FAST]) == 0
    difference = np.abs(_pixels(single).astype(int) - _pixels(tmp_path / "many-1.png").astype(int)).max()
    assert difference <= 2  # image k is seed + k (up to the rounding of another batch size)


def test_generate_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        assert main(["generate", "a small cyan ring at the bottom", "-o", str(tmp_path / name), "--seed", "11", *FAST]) == 0
    assert np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "b.png"))


def test_generate_swaps_guider_and_scheduler_and_sizes(tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    args = ["generate", "a blue cross", "-o", str(out), "--size", "48", "--guider", "AdaptiveProjectedGuidance",
            "--guidance", "2", "--scheduler", "FlowMatchEulerDiscreteScheduler", "--negative-prompt", "a red cross", *FAST]  # fmt: skip
    assert main(args) == 0
    assert _size(out) == (48, 48)
    assert main(["generate", "a blue cross", "-o", str(out), "--height", "32", "--width", "64", *FAST]) == 0
    assert _size(out) == (64, 32)


def test_generate_under_a_memory_budget_makes_the_same_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain, placed = tmp_path / "plain.png", tmp_path / "placed.png"
    assert main(["generate", "a small red circle", "-o", str(plain), "--device", "cpu", *FAST]) == 0
    # 80 MiB: group offload of the built-in model's 142 MiB of weights; "auto" measures what the CPU has free
    for budget in ("80MiB", "auto"):
        assert main(["generate", "a small red circle", "-o", str(placed), "--device", "cpu", "--memory-budget", budget, *FAST]) == 0
        assert np.array_equal(_pixels(plain), _pixels(placed))


def test_generate_from_an_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    start = tmp_path / "start.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(start)
    out = tmp_path / "edit.png"
    assert main(["generate", "a red circle", "-o", str(out), "--image", str(start), "--strength", "0.5", *FAST]) == 0
    assert "(img2img)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--guider", "Nope"], "unknown guider 'Nope'; known: AdaptiveProjectedGuidance, "),
        (["--scheduler", "Nope"], "unknown scheduler 'Nope'; known: DDIMScheduler, "),
        (["--size", "30"], "height: height 30 is not a positive multiple of 4 (the VAE factor); use 28 or 32"),
        (["--size", "0"], "--height must be a positive number, got 0"),
        (["--size", "32", "--width", "32"], "give --size or --height/--width, not both"),
        (["--scheduler", "DDIMScheduler"], "DDIMScheduler cannot sample this model: it was trained for flow matching"),
        (["--strength", "0.5"], "--strength needs --image"),
        (["--guider", "FrequencyDecoupledGuidance", "--guidance", "3"], "FrequencyDecoupledGuidance has no guidance scale"),
        (["--image", "missing.png"], "No such file or directory"),
        (["--model", "/no/such/folder"], "is neither a local folder nor a repository in the Hugging Face cache"),
        (["--size", "100000"], "height: height 100000 is larger than 16384 pixels, the most a call may ask for"),
        (["--size", "8192", "--num-images", "64"], "num_images_per_prompt: 64 images of 8192x8192 need"),
        (["--guidance", "inf"], "--guidance must be a finite number, got inf"),
        (["--guidance", "nan", "--guider", "AdaptiveProjectedGuidance"], "--guidance must be a finite number, got nan"),
        (["--seed", "-1"], "--seed: Input should be greater than or equal to 0"),
        (["--num-images", "65"], "--num-images: Input should be less than or equal to 64"),
        (["--memory-budget", "lots"], "memory size 'lots' is not a size: write a number and a unit"),
        (["--memory-budget", "1MiB", "--device", "cpu"], "memory budget 1.0 MiB on cpu is below the smallest placement"),
    ],
)
def test_generate_errors_are_one_line(args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "a red circle", "-o", str(tmp_path / "o.png"), *FAST, *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("diffblocks generate: error: ") and captured.err.count("\n") == 1
    assert message in captured.err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("guider", ["PerturbedAttentionGuidance", "SkipLayerGuidance", "SmoothedEnergyGuidance", "AutoGuidance"])
def test_generate_gives_perturbing_guiders_the_models_layers(guider: str, tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    assert main(["generate", "a red circle", "-o", str(out), "--guider", guider, *FAST]) == 0
    assert _size(out) == (64, 64)


def test_generate_reports_settings_a_guider_refuses_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a model family that no guider has default layers for
    monkeypatch.setattr("diffblocks.components.guiders.FAMILIES", ("sd15", "sdxl", "flux"))
    assert main(["generate", "a red circle", "-o", str(tmp_path / "o.png"), "--guider", "SkipLayerGuidance", *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffblocks generate: error: SkipLayerGuidance: ") and err.count("\n") == 1


def test_generate_on_flux_gives_guidance_to_the_model_even_with_a_guider(tmp_path: Path) -> None:
    """Flux-dev embeds its guidance: --guidance sets that, and a chosen guider keeps its own scale."""
    from tests.presets.flux_fixtures import tiny_flux

    repo = tiny_flux(tmp_path / "flux")

    def generate(name: str, *args: str) -> None:
        assert main(["generate", "a red circle", "--model", str(repo), "--size", "32", *FAST, "-o", str(tmp_path / name), *args]) == 0

    generate("plain.png", "--guidance", "5.0")
    generate("cfg.png", "--guidance", "5.0", "--guider", "ClassifierFreeGuidance")
    generate("weak.png", "--guidance", "1.0")
    plain = _pixels(tmp_path / "plain.png")
    assert np.array_equal(_pixels(tmp_path / "cfg.png"), plain)
    assert not np.array_equal(_pixels(tmp_path / "weak.png"), plain)  # the embedded guidance did change the image


@pytest.mark.parametrize("guider", ["PerturbedAttentionGuidance", "AutoGuidance"])
def test_generate_on_flux_uses_the_family_settings_of_perturbing_guiders(guider: str, tmp_path: Path) -> None:
    """On Flux a perturbing guider guides by its perturbation alone: no negative prompt, and not a no-op."""
    from tests.presets.flux_fixtures import tiny_flux

    repo = tiny_flux(tmp_path / "flux", double_blocks=10)
    # ten steps: PAG perturbs only from 1 % to 20 % of the schedule, which two steps would miss
    common = ["generate", "a red circle", "--model", str(repo), "--size", "32", "--steps", "10", "--no-progress"]
    assert main([*common, "-o", str(tmp_path / "plain.png")]) == 0
    assert main([*common, "--guider", guider, "-o", str(tmp_path / "guided.png")]) == 0
    assert not np.array_equal(_pixels(tmp_path / "guided.png"), _pixels(tmp_path / "plain.png"))
