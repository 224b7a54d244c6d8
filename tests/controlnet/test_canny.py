"""canny(): kornia's edges, with thresholds on OpenCV's scale, and bad input refused before any work."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from diffblocks.blocks.standard.canny import canny


def photo(seed: int = 0, size: int = 48) -> PIL.Image.Image:
    """Shapes on a noisy background: edges of several directions, texture the thresholds must keep out."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal(90, 6, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    pixels[(yy - 16) ** 2 + (xx - 30) ** 2 < 100] = (250, 230, 200)
    pixels[30:42, 6:20] = (20, 60, 20)
    return PIL.Image.fromarray(pixels.clip(0, 255).astype("uint8"))


@pytest.mark.parametrize(("low", "high", "sigma"), [(100, 200, 0.0), (50, 120, 1.0), (20, 60, 1.5)])
def test_edges_are_kornias(low: float, high: float, sigma: float) -> None:
    import kornia

    image = photo()
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    size = 1 if sigma == 0 else 2 * int(np.ceil(3 * sigma)) + 1
    _, expected = kornia.filters.canny(pixels, low / 255, high / 255, kernel_size=size, sigma=(sigma or 1.0,) * 2)
    edges = np.asarray(canny(image, low, high, sigma=sigma))
    assert edges.shape == (48, 48, 3) and set(np.unique(edges)) <= {0, 255}
    assert (edges[..., 0] == edges[..., 2]).all() and edges.any()
    assert np.array_equal(edges[..., 0] == 255, expected[0, 0].numpy() == 1)


def test_thresholds_are_on_opencvs_scale() -> None:
    """A vertical step of ``d`` grey levels has an unnormalised Sobel gradient of ``4 d`` on the 0..255 scale."""
    faint, strong = PIL.Image.new("L", (16, 16)), PIL.Image.new("L", (16, 16))
    faint.paste(20, (8, 0, 16, 16))    # gradient 80: below low=100
    strong.paste(60, (8, 0, 16, 16))   # gradient 240: above high=200
    assert not np.asarray(canny(faint)).any()
    assert np.asarray(canny(strong))[4:12, :, 0].nonzero()[1].tolist() == [7] * 8
    assert np.asarray(canny(faint, 50, 70)).any()


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (dict(image=np.zeros((8, 8, 3), "uint8")), TypeError, "takes a PIL image, got ndarray"),
        (dict(low=200, high=100), ValueError, "needs 0 <= low <= high .* got low=200, high=100"),
        (dict(low=-1), ValueError, "needs 0 <= low <= high"),
        (dict(sigma=-0.5), ValueError, r"needs sigma >= 0 .* got -0.5"),
    ],
)
def test_bad_input_is_refused(args: dict, error: type[Exception], message: str) -> None:
    kwargs = {"image": photo(), **args}
    with pytest.raises(error, match=message):
        canny(**kwargs)
