"""Images are read by their type (8 bits, 16 bits, floats in [0, 1]); values of an unknown range are refused."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from diffblocks.blocks.standard.images import ImageLike, image_range_problem, to_tensor
from diffblocks.blocks.standard.masks import MaskLike, mask_to_tensor


@pytest.mark.parametrize(
    "image",
    [
        PIL.Image.new("RGB", (4, 4), (128, 128, 128)),
        PIL.Image.fromarray(np.full((4, 4), 128 * 257, dtype=np.uint16)),  # "I;16"
        PIL.Image.new("I", (4, 4), 128 * 257),
        PIL.Image.new("F", (4, 4), 128 / 255),
        np.full((4, 4, 3), 128, dtype=np.uint8),
        np.full((4, 4, 3), 128 * 257, dtype=np.uint16),
        np.full((4, 4, 3), 128 / 255, dtype=np.float32),
        torch.full((1, 3, 4, 4), 128, dtype=torch.uint8),
        torch.full((1, 3, 4, 4), 128 / 255),
        torch.full((1, 3, 4, 4), 128 * 257, dtype=torch.uint16),
    ],
    ids=["rgb8", "pil-i16", "pil-i", "pil-f", "uint8", "uint16", "float", "tensor-uint8", "tensor-float", "tensor-uint16"],
)
def test_every_kind_of_image_reads_as_the_same_mid_grey(image: ImageLike) -> None:
    assert image_range_problem(image) is None
    for size in (4, 8):  # as given, and resampled
        pixels = to_tensor(image, height=size, width=size)
        assert pixels.shape == (1, 3, size, size)
        assert torch.allclose(pixels, torch.full_like(pixels, 128 / 255), atol=1e-3)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.full((4, 4, 3), 255.0, dtype=np.float32), r"values in \[255, 255\].*looks like \[0, 255\]: pass x / 255"),
        (torch.full((1, 3, 4, 4), -1.0), r"float tensor with values in \[-1, -1\].*looks like \[-1, 1\]: pass \(x \+ 1\) / 2"),
        (np.full((4, 4, 3), 1000.0, dtype=np.float32), r"rescale it to \[0, 1\]"),
        (torch.zeros(1, 3, 4, 4, dtype=torch.int32), r"is a int32 tensor, whose range is not known"),
        (torch.full((1, 3, 4, 4), float("nan")), r"holds NaN or infinite values"),
        (PIL.Image.new("F", (4, 4), 2.0), r"a PIL 'F' image with values in \[2, 2\]; this mode is read as \[0, 1\]"),
        (PIL.Image.new("I", (4, 4), 70000), r"a PIL 'I' image with values in \[7e\+04, 7e\+04\]; this mode is read as \[0, 65535\]"),
    ],
)
def test_images_of_unknown_range_are_refused_with_the_conversion(image: ImageLike, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_tensor(image, height=4, width=4)


def test_uint8_masks_are_read_as_0_to_255() -> None:
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[:2] = 255
    mask[2, 0] = 1  # 1/255: kept, not repainted
    binary = mask_to_tensor(mask, height=4, width=4)
    assert binary[0, 0, :2].eq(1).all() and binary[0, 0, 2:].eq(0).all()
    assert torch.equal(mask_to_tensor(torch.from_numpy(mask), height=4, width=4), binary)


@pytest.mark.parametrize(
    "mask",
    [
        np.array([[1.0, 0.6], [0.4, 0.0]], dtype=np.float32),
        PIL.Image.fromarray(np.array([[1.0, 0.6], [0.4, 0.0]], dtype=np.float32)),  # "F", read as [0, 1]
        PIL.Image.fromarray(np.array([[65535, 39321], [26214, 0]], dtype=np.uint16)),  # "I;16", read as [0, 65535]
        np.array([[65535, 39321], [26214, 0]], dtype=np.uint16),
        torch.tensor([[65535, 39321], [26214, 0]], dtype=torch.uint16),
    ],
    ids=["float", "pil-f", "pil-i16", "uint16", "tensor-uint16"],
)
def test_every_kind_of_mask_is_read_by_its_type_as_images_are(mask: MaskLike) -> None:
    # 1.0 and 0.6 repainted, 0.4 and 0 kept, whatever type carries them
    binary = mask_to_tensor(mask, height=2, width=2)
    assert binary[0, 0].tolist() == [[1.0, 1.0], [0.0, 0.0]]
