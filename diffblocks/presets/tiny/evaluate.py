"""Measure a tiny-world model's prompt adherence through its pipeline, and draw sample galleries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from diffblocks.blocks import Pipeline
from diffblocks.presets.tiny.checker import CheckResult, check
from diffblocks.presets.tiny.eval_prompts import EVAL_PROMPTS
from diffblocks.presets.tiny.preset import DEFAULT_STEPS


@dataclass(frozen=True)
class AdherenceReport:
    """Checker verdicts for generated images: ``score`` is the fraction of images that pass."""

    results: tuple[CheckResult, ...]
    images: tuple[Image.Image, ...]

    @property
    def score(self) -> float:
        return sum(result.passed for result in self.results) / len(self.results)

    def failures(self) -> dict[str, int]:
        """How often each criterion failed, e.g. ``{"relation": 3, "object 2 shape": 1}``."""
        counts: dict[str, int] = {}
        for result in self.results:
            for name in result.failures():
                counts[name] = counts.get(name, 0) + 1
        return dict(sorted(counts.items(), key=lambda item: -item[1]))


def generate(
    pipe: Pipeline,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int],
    guidance_scale: float | None = None,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 64,
) -> list[Image.Image]:
    """One image per prompt, image ``i`` from a CPU generator seeded with ``seeds[i]``.

    Each image's starting noise depends only on its seed, so a subset reproduces the images of the
    full set (up to the floating-point rounding of other batch sizes).

    Args:
        pipe: a tiny-family pipeline.
        prompts: what to draw.
        seeds: one seed per prompt.
        guidance_scale: override the pipeline guider's scale (1 turns classifier-free guidance off).
        steps: denoising steps.
        batch_size: prompts per pipeline call.
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"need one seed per prompt: {len(seeds)} seeds, {len(prompts)} prompts")
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[start : start + batch_size]]
        out = pipe(
            prompt=chunk,
            generator=generators,
            guidance_scale=guidance_scale,
            num_inference_steps=steps,
            progress=False,
        )
        images += out.images
    return images


def measure_adherence(
    pipe: Pipeline,
    prompts: Sequence[str] = EVAL_PROMPTS,
    *,
    seeds: Sequence[int] | None = None,
    guidance_scale: float | None = None,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 64,
) -> AdherenceReport:
    """Generate one image per prompt (seed ``i`` for prompt ``i`` unless ``seeds`` is given) and check each.

    Args:
        pipe: a tiny-family pipeline.
        prompts: tiny-world prompts (default: the fixed ``EVAL_PROMPTS``).
        seeds: one seed per prompt (default: ``0, 1, 2, ...``).
        guidance_scale: override the guider's scale; ``1.0`` measures the model without guidance.
        steps: denoising steps.
        batch_size: prompts per pipeline call.
    """
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    images = generate(pipe, prompts, seeds=seeds, guidance_scale=guidance_scale, steps=steps, batch_size=batch_size)
    results = tuple(check(image, prompt) for image, prompt in zip(images, prompts))
    return AdherenceReport(results, tuple(images))


def gallery(images: Sequence[Image.Image], *, columns: int = 8, scale: int = 2, gap: int = 2) -> Image.Image:
    """A white-spaced grid of images, each enlarged ``scale`` times with nearest-neighbour sampling."""
    if not images:
        raise ValueError("gallery needs at least one image")
    width, height = images[0].width * scale, images[0].height * scale
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * (width + gap) - gap, rows * (height + gap) - gap), "white")
    for i, image in enumerate(images):
        tile = image.convert("RGB").resize((width, height), Image.Resampling.NEAREST)
        sheet.paste(tile, ((i % columns) * (width + gap), (i // columns) * (height + gap)))
    return sheet
