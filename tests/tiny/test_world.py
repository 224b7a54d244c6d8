"""The procedural world: determinism, geometry, conditioning on a spec, throughput."""

from __future__ import annotations

import time
from itertools import combinations

import numpy as np
import pytest

from diffblocks.presets.tiny import Scene, SceneObject, make_batch, parse_prompt, render, sample_scene
from diffblocks.presets.tiny.vocabulary import BACKGROUNDS, MARGIN, MIN_GAP, PALETTE

from .helpers import satisfies


def test_make_batch_is_a_pure_function_of_seed_and_index() -> None:
    images, captions = make_batch(12, seed=3)
    again, again_captions = make_batch(12, seed=3)
    shard, shard_captions = make_batch(4, seed=3, start=5)
    assert images.shape == (12, 64, 64, 3) and images.dtype == np.uint8 and len(captions) == 12
    assert np.array_equal(images, again) and captions == again_captions
    assert np.array_equal(images[5:9], shard) and captions[5:9] == shard_captions
    other, _ = make_batch(12, seed=4)
    assert not np.array_equal(images, other)


def test_sample_scene_and_render_are_deterministic() -> None:
    first = sample_scene(np.random.default_rng(11))
    assert first == sample_scene(np.random.default_rng(11))
    assert np.array_equal(render(first), render(first))
    assert render(first, size=128).shape == (128, 128, 3)


def test_palette_is_well_separated_from_itself_and_the_backgrounds() -> None:
    colours = [np.array(c, dtype=float) for c in PALETTE.values()]
    backgrounds = [np.array(c, dtype=float) for c in BACKGROUNDS.values()]
    assert min(np.linalg.norm(a - b) for a, b in combinations(colours, 2)) > 95
    assert min(np.linalg.norm(a - b) for a in colours for b in backgrounds) > 95


def _box(obj: SceneObject) -> tuple[float, float, float, float]:
    (x, y), half = obj.center, obj.extent / 2
    return x - half, y - half, x + half, y + half


def _gap(scene: Scene) -> float:
    a, b = (_box(o) for o in scene.objects)
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def test_objects_stay_inside_and_pairs_keep_a_gap_along_their_relation() -> None:
    rng = np.random.default_rng(0)
    for _ in range(2000):
        scene = sample_scene(rng)
        for obj in scene.objects:
            x0, y0, x1, y1 = _box(obj)
            assert min(x0, y0) >= MARGIN - 1e-9 and max(x1, y1) <= 1 - MARGIN + 1e-9
        if len(scene.objects) == 2:
            assert _gap(scene) >= MIN_GAP - 1e-9
            (ax, ay), (bx, by) = (o.center for o in scene.objects)
            dx, dy = bx - ax, by - ay
            expected = {"above": dy > abs(dx), "below": -dy > abs(dx), "left of": dx > abs(dy), "right of": -dx > abs(dy)}
            assert scene.relation is not None and expected[scene.relation]


@pytest.mark.parametrize(
    "prompt",
    [
        "a red circle above a blue square",
        "a small green triangle in the top right corner on a white background",
        "a big cyan ring and a little purple cross",
        "an orange square on the left",
    ],
)
def test_sample_scene_honours_a_spec(prompt: str) -> None:
    spec = parse_prompt(prompt)
    rng = np.random.default_rng(5)
    assert all(satisfies(sample_scene(rng, spec), spec) for _ in range(50))


def test_training_stream_is_fast() -> None:
    make_batch(20, seed=0)  # warm the shape-mask cache
    start = time.perf_counter()
    make_batch(1000, seed=1)
    rate = 1000 / (time.perf_counter() - start)
    # ~3,000/s on one core of a busy shared machine; the bound only catches a regression to slow paths.
    assert rate > 500, f"{rate:.0f} samples/s"
