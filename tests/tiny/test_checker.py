"""The adherence checker: accuracy on clean, degraded and mismatching renders; the eval prompt set."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffblocks.presets.tiny import (
    BACKGROUND_COLOURS,
    COLOURS,
    EVAL_PROMPTS,
    RELATIONS,
    SHAPES,
    adherence,
    caption,
    check,
    parse_prompt,
    render,
    sample_scene,
)
from diffblocks.presets.tiny.phrases import POSITION_PHRASES

from .helpers import degrade, perturb

N = 300  # scenes per accuracy test: enough to resolve 98 % within about +-1.5 %


def _pass_rate(seed: int, *, blur: float = 0.0, noise: float = 0.0) -> float:
    rng = np.random.default_rng(seed)
    passed = 0
    for _ in range(N):
        scene = sample_scene(rng)
        image = render(scene)
        if blur or noise:
            image = degrade(image, blur=blur, noise=noise, rng=rng)
        passed += check(image, caption(scene, rng)).passed
    return passed / N


def test_clean_renders_pass_their_captions() -> None:
    assert _pass_rate(0) >= 0.98  # measured: 1.000 over 1,000 scenes


@pytest.mark.parametrize(("blur", "noise"), [(0.7, 4.0), (1.0, 6.0)])
def test_blurred_noisy_renders_pass_their_captions(blur: float, noise: float) -> None:
    assert _pass_rate(1, blur=blur, noise=noise) >= 0.98  # measured: 1.000 at both levels


def test_renders_that_break_one_asked_attribute_fail() -> None:
    rng = np.random.default_rng(2)
    rejected: dict[str, list[bool]] = {}
    for _ in range(N):
        scene = sample_scene(rng)
        text = caption(scene, rng)
        field, wrong = perturb(scene, parse_prompt(text), rng)
        image = degrade(render(sample_scene(rng, wrong)), blur=0.7, noise=4.0, rng=rng)
        rejected.setdefault(field, []).append(not check(image, text).passed)
    assert set(rejected) == {"count", "colour", "shape", "size", "relation", "position", "background"}
    total = sum(map(sum, rejected.values())) / N
    assert total >= 0.98, {k: f"{np.mean(v):.3f} of {len(v)}" for k, v in rejected.items()}


def test_result_names_each_criterion_and_the_failures() -> None:
    scene = sample_scene(np.random.default_rng(3), parse_prompt("a small red circle above a large blue square"))
    good = check(render(scene), "a small red circle above a large blue square on a white background")
    assert list(good.criteria) == [
        "count",
        "object 1 colour",
        "object 1 shape",
        "object 1 size",
        "object 2 colour",
        "object 2 shape",
        "object 2 size",
        "relation",
        "background",
    ]
    assert good.failures() == ([] if scene.background.colour == "white" else ["background"])
    swapped = check(render(scene), "a small red circle below a large blue square")
    assert not swapped.passed and swapped.failures() == ["relation"]
    wrong = check(render(scene), "a small red ring above a large green square")
    assert wrong.failures() == ["object 1 shape", "object 2 colour"]


def test_blank_and_noise_images_fail() -> None:
    blank = np.full((64, 64, 3), 245, dtype=np.uint8)
    result = check(blank, "a red circle")
    assert not result.passed and result.detections == () and result.background == "white"
    static = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not check(static, "a red circle").passed


def test_accepts_pil_float_and_other_sizes() -> None:
    scene = sample_scene(np.random.default_rng(4), parse_prompt("a big yellow cross on the right"))
    prompt = "a big yellow cross on the right"
    assert check(Image.fromarray(render(scene, size=128)), prompt).passed
    assert check(render(scene).astype(np.float32) / 255.0, prompt).passed
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) RGB array, got shape \(3, 64, 64\)"):
        check(render(scene).transpose(2, 0, 1), prompt)


def test_eval_prompts_cover_the_world_and_renders_of_them_score_one() -> None:
    assert len(EVAL_PROMPTS) == 64 and len(set(EVAL_PROMPTS)) == 64
    specs = [parse_prompt(p) for p in EVAL_PROMPTS]
    objects = [o for s in specs for o in s.objects]
    assert {o.shape for o in objects} == set(SHAPES) and {o.colour for o in objects} == set(COLOURS)
    assert {o.position for o in objects if o.position} == set(POSITION_PHRASES)
    assert {s.relation for s in specs if s.relation} == set(RELATIONS)
    assert {s.background for s in specs if s.background} == set(BACKGROUND_COLOURS)
    assert {o.size for o in objects if o.size} == {"small", "large"}
    rng = np.random.default_rng(5)
    images = np.stack([render(sample_scene(rng, spec)) for spec in specs])
    assert adherence(images, EVAL_PROMPTS) == 1.0
    assert adherence(images[::-1], EVAL_PROMPTS) < 0.2  # renders of other prompts rarely pass
    with pytest.raises(ValueError, match="need one image per prompt and at least one: 63 images, 64 prompts"):
        adherence(images[:63], EVAL_PROMPTS)
