"""Train the built-in tiny model: ``python -m diffblocks.presets.tiny.train --out DIR [--device cuda] [--minutes N]``.

Writes ``DIR/model`` (the shippable folder, EMA weights in float16, refreshed at checkpoints),
``DIR/log.txt``, ``DIR/report.json`` (settings, versions, timings, adherence), ``DIR/gallery.png``
and ``DIR/reconstructions.png``. Every random draw comes from ``--seed``; a run bounded by
``--steps`` / ``--vae-steps`` alone is repeatable (one bounded by minutes stops where the clock says).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffblocks.components.guiders import ClassifierFreeGuidance
from diffblocks.components.models.autoencoder_kl import AutoencoderKL
from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.presets.tiny.architecture import new_scheduler, new_unet, new_vae
from diffblocks.presets.tiny.eval_prompts import EVAL_PROMPTS
from diffblocks.presets.tiny.export import save_tiny_model
from diffblocks.presets.tiny.preset import DEFAULT_GUIDANCE_SCALE
from diffblocks.presets.tiny.text_encoder import encode_prompts, load_text_encoder, packaged_text_encoder_dir
from diffblocks.presets.tiny.train.autoencoder import encode_dataset, train_autoencoder, with_latent_stats
from diffblocks.presets.tiny.train.data import encode_tokens, make_dataset
from diffblocks.presets.tiny.train.denoiser import TextFeatures, train_denoiser
from diffblocks.presets.tiny.train.report import select_and_measure, write_pictures, write_report
from diffblocks.presets.tiny.train.schedule import EMA, Budget


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m diffblocks.presets.tiny.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=600_000, help="dataset size (images and captions)")
    p.add_argument("--workers", type=int, default=1, help="processes that render the dataset")
    p.add_argument("--vae-minutes", type=float, default=None)
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--vae-batch-size", type=int, default=128)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--minutes", type=float, default=None, help="denoiser training time")
    p.add_argument("--steps", type=int, default=None, help="denoiser training steps")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--checkpoint-every", type=float, default=120.0, help="seconds between exports during training")
    p.add_argument("--eval-scales", type=float, nargs="*", default=[1.0, 2.0, 3.0, 4.0, 5.0, 6.5, 8.0])
    p.add_argument("--resume", type=Path, default=None, help="fine-tune a tiny model folder (its autoencoder is kept)")
    p.add_argument("--eval-prompts", type=int, default=64, help="measure on the first N of EVAL_PROMPTS")
    p.add_argument("--text-encoder", type=Path, default=None, help="MiniLM folder (default: the packaged one)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast precision on CUDA")
    args = p.parse_args(argv)
    if args.vae_minutes is None and args.vae_steps is None:
        args.vae_steps = 2000
    if args.minutes is None and args.steps is None:
        args.steps = 20_000
    return args


class Log:
    """Lines to stdout and ``log.txt``, stamped with seconds since the start."""

    def __init__(self, path: Path) -> None:
        self.path, self.start = path, time.monotonic()
        path.write_text("")

    def __call__(self, line: str) -> None:
        stamped = f"[{time.monotonic() - self.start:7.1f}s] {line}"
        print(stamped, flush=True)
        with self.path.open("a") as handle:
            handle.write(stamped + "\n")


def _autocast(args: argparse.Namespace, device: torch.device, log: Log) -> torch.dtype | None:
    """bfloat16 autocast on CUDA when asked and when a forward and backward pass of both models runs in it."""
    if device.type != "cuda" or args.precision != "bf16":
        return None
    try:
        unet, vae = new_unet().to(device), new_vae().to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            x = torch.randn(2, 4, 16, 16, device=device, dtype=torch.bfloat16)
            context = torch.randn(2, 8, 384, device=device, dtype=torch.bfloat16)
            mask = torch.ones(2, 8, dtype=torch.bool, device=device)
            t = torch.tensor([10.0, 900.0], device=device)
            loss = unet(x, t, context, encoder_attention_mask=mask).float().mean()
            loss = loss + vae.decode(vae.encode(torch.randn(2, 3, 64, 64, device=device)).mode()).float().mean()
        loss.backward()
    except RuntimeError as error:  # an unsupported kernel or dtype mix: train in float32 rather than not at all
        log(f"bfloat16 autocast failed ({error}); training in float32")
        return None
    return torch.bfloat16


def main(argv: Sequence[str] | None = None, *, on_checkpoint: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Run every stage; ``on_checkpoint(out)`` is called after each export (to copy results elsewhere)."""
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log, device = Log(out / "log.txt"), torch.device(args.device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report: dict[str, Any] = {
        "command": "python -m diffblocks.presets.tiny.train " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "timings_s": {},
    }
    timings: dict[str, float] = report["timings_s"]
    text_dir = args.text_encoder or packaged_text_encoder_dir()
    stage = time.monotonic()

    # Forked renderers must start before the device is touched.
    data = make_dataset(args.samples, seed=args.seed, text_encoder_dir=text_dir, workers=args.workers)
    timings["dataset"] = time.monotonic() - stage
    log(f"dataset: {len(data.images)} samples in {timings['dataset']:.0f}s")

    stage = time.monotonic()
    tokenizer, encoder = load_text_encoder(text_dir, device=device)
    empty = encode_prompts([""], tokenizer=tokenizer, model=encoder)
    text = TextFeatures(
        tokens=encode_tokens(encoder, data.input_ids, data.attention_mask, device=device),
        mask=torch.from_numpy(data.attention_mask).to(device),
        empty_tokens=empty.tokens.to(torch.float16),
        empty_mask=empty.mask,
    )
    del encoder
    timings["text_features"] = time.monotonic() - stage
    log(f"text features: {tuple(text.tokens.shape)} in {timings['text_features']:.0f}s")

    generator = torch.Generator(device).manual_seed(args.seed)
    autocast = _autocast(args, device, log)
    report["autocast"] = str(autocast)
    images = torch.from_numpy(data.images).to(device)
    stage = time.monotonic()
    init: UNet2DConditionModel | None = None
    if args.resume is not None:
        vae = AutoencoderKL.from_pretrained(args.resume, subfolder="vae", device=device)
        init = UNet2DConditionModel.from_pretrained(args.resume, subfolder="unet", device=device)
        latents = vae.normalize_latents(encode_dataset(vae, images)).to(torch.float16)
        report["vae"] = {"resumed_from": str(args.resume)}
    else:
        vae_budget = Budget(steps=args.vae_steps, seconds=_seconds(args.vae_minutes), warmup=100)
        vae = train_autoencoder(
            images, budget=vae_budget, batch_size=args.vae_batch_size, lr=args.vae_lr, kl_weight=args.kl_weight,
            generator=generator, autocast=autocast, log=log,
        )  # fmt: skip
        raw = encode_dataset(vae, images)
        vae = with_latent_stats(vae, raw)
        latents = vae.normalize_latents(raw).to(torch.float16)
        del raw
        stats = {"latents_mean": vae.params.latents_mean, "latents_std": vae.params.latents_std}
        report["vae"] = {"steps": vae_budget.step, **stats}
    timings["autoencoder"] = time.monotonic() - stage
    log(f"autoencoder: {report['vae']}")

    scheduler, folder = new_scheduler(), out / "model"

    def export(unet: UNet2DConditionModel, ema: EMA, scale: float = DEFAULT_GUIDANCE_SCALE) -> UNet2DConditionModel:
        shipped = new_unet().to(device)
        ema.copy_to(shipped)
        guider = ClassifierFreeGuidance(guidance_scale=scale)
        save_tiny_model(folder, unet=shipped, vae=vae, scheduler=scheduler, guider=guider)
        write_report(out, report)
        if on_checkpoint is not None:
            on_checkpoint(out)
        return shipped.eval()

    def checkpoint(unet: UNet2DConditionModel, ema: EMA) -> None:
        report["unet_steps"] = budget.step
        export(unet, ema)
        log(f"checkpoint at step {budget.step}")

    stage = time.monotonic()
    budget = Budget(steps=args.steps, seconds=_seconds(args.minutes), warmup=250)
    unet, ema = train_denoiser(
        latents, text, scheduler=scheduler, budget=budget, batch_size=args.batch_size, lr=args.lr,
        caption_dropout=args.caption_dropout, ema_decay=args.ema_decay, generator=generator, autocast=autocast,
        log=log, checkpoint=checkpoint, checkpoint_every=args.checkpoint_every, init=init,
    )  # fmt: skip
    timings["denoiser"] = time.monotonic() - stage
    report["unet_steps"] = budget.step
    log(f"denoiser: {budget.step} steps in {timings['denoiser']:.0f}s")
    shipped = export(unet, ema)

    if args.eval_scales:
        stage = time.monotonic()
        candidates = {"ema": shipped, "raw": unet}
        prompts = EVAL_PROMPTS[: args.eval_prompts]
        report["evaluation"] = select_and_measure(
            folder, candidates=candidates, scales=args.eval_scales, device=device, log=log, prompts=prompts
        )
        chosen = candidates[report["evaluation"]["weights"]]
        scale = report["evaluation"]["guidance_scale"]
        guider = ClassifierFreeGuidance(guidance_scale=scale)
        save_tiny_model(folder, unet=chosen, vae=vae, scheduler=scheduler, guider=guider)
        write_pictures(folder, out, vae=vae, images=images[:16], device=device, scale=scale, count=min(32, args.eval_prompts))
        timings["evaluation"] = time.monotonic() - stage
    write_report(out, report)
    if on_checkpoint is not None:
        on_checkpoint(out)
    log("done")
    return report


def _seconds(minutes: float | None) -> float | None:
    return None if minutes is None else minutes * 60.0


if __name__ == "__main__":
    main()
