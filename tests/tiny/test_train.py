"""Training pieces: the flow interpolation equals the scheduler's, the budget's learning rate, EMA, a CPU smoke run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffblocks.blocks import Pipeline
from diffblocks.presets.tiny import make_batch, packaged_text_encoder_dir
from diffblocks.presets.tiny.architecture import new_scheduler
from diffblocks.presets.tiny.train.__main__ import main
from diffblocks.presets.tiny.train.data import make_dataset
from diffblocks.presets.tiny.train.denoiser import flow_interpolate, sample_sigmas
from diffblocks.presets.tiny.train.schedule import EMA, Budget


def test_flow_interpolation_is_the_schedulers_add_noise() -> None:
    scheduler = new_scheduler()
    state = scheduler.set_timesteps(10)
    x0, noise = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16)
    for step in (0, 4, 9):
        sigma = torch.full((3,), state.full_sigmas[step])
        torch.testing.assert_close(flow_interpolate(x0, noise, sigma), scheduler.add_noise(state, x0, noise, step))
        assert float(state.timesteps[step]) == pytest.approx(float(sigma[0]) * scheduler.num_train_timesteps)


def test_sigmas_cover_the_path() -> None:
    sigmas = sample_sigmas(20_000, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    assert 0 < float(sigmas.min()) < 0.01 and 0.99 < float(sigmas.max()) <= 1.0
    assert abs(float(sigmas.mean()) - 0.5) < 0.01


def test_budget_warms_up_then_anneals() -> None:
    budget = Budget(steps=100, seconds=None, warmup=10, final_fraction=0.1)
    factors = []
    while not budget.done():
        factors.append(budget.lr_factor())
        budget.step += 1
    assert len(factors) == 100 and factors[0] == pytest.approx(0.1) and max(factors) == pytest.approx(1.0, abs=0.01)
    assert factors[-1] == pytest.approx(0.1, abs=0.01)
    with pytest.raises(ValueError, match="steps or seconds"):
        Budget(steps=None, seconds=None, warmup=0)


def test_ema_starts_at_the_weights_and_follows_them() -> None:
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # warm-up decay 1/10 at the first update
    target = torch.nn.Linear(2, 2)
    ema.copy_to(target)
    torch.testing.assert_close(target.weight, model.weight - 0.1)


def test_dataset_matches_the_world_stream_whatever_the_workers() -> None:
    one = make_dataset(10, seed=3, text_encoder_dir=packaged_text_encoder_dir(), workers=1)
    images, _ = make_batch(10, seed=3)
    assert np.array_equal(one.images, images) and one.input_ids.shape == (10, 32)
    assert one.attention_mask.dtype == bool and one.attention_mask[:, 0].all()


def test_a_tiny_cpu_run_exports_a_loadable_model(tmp_path: Path) -> None:
    args = ["--out", str(tmp_path), "--samples", "16", "--vae-steps", "1", "--vae-batch-size", "2",
            "--steps", "1", "--batch-size", "2", "--eval-scales"]  # fmt: skip
    report = main(args)
    assert report["unet_steps"] == 1 and report["vae"]["steps"] == 1 and report["autocast"] == "None"
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["torch"] == torch.__version__ and "dataset" in saved["timings_s"]
    pipe = Pipeline.from_pretrained(str(tmp_path / "model"))
    assert pipe.components["vae"].params.latents_std == tuple(report["vae"]["latents_std"])
    resumed = main(["--out", str(tmp_path / "again"), "--resume", str(tmp_path / "model"), "--samples", "8",
                    "--steps", "1", "--batch-size", "2", "--eval-scales"])  # fmt: skip
    assert resumed["vae"] == {"resumed_from": str(tmp_path / "model")}
