"""GroupNorm: the split form equals PyTorch's group norm; the module is a drop-in ``nn.GroupNorm``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffblocks.components.models.layers.norm import SPLIT_MIN_ROW, GroupNorm, split_group_norm, takes_split

SHAPES = [
    (1, 64, 16, 16),  # few planes: each (sample, channel) row is cut into pieces
    (2, 128, 8, 8),
    (1, 1024, 4, 4),  # at least MIN_PLANES (512) channels: one piece each
    (3, 64, 10),  # a sequence, as the VAE's attention normalises it
    (2, 96, 5, 7),  # a row length that the wanted piece count does not divide
]


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, offset: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + offset
    weight = torch.rand(shape[1], generator=g) + 0.5
    bias = torch.randn(shape[1], generator=g)
    return x.to(dtype), weight.to(dtype), bias.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_split_matches_group_norm_in_float32(shape: tuple[int, ...], affine: bool) -> None:
    x, weight, bias = _inputs(shape, torch.float32, offset=5.0)
    if not affine:
        weight = bias = None
    out = split_group_norm(x, 32, weight=weight, bias=bias, eps=1e-6)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, F.group_norm(x, 32, weight, bias, 1e-6), rtol=0, atol=1e-5)


def test_split_refuses_groups_that_do_not_divide_the_channels() -> None:
    with pytest.raises(ValueError, match="48 channels do not split into 32 groups"):
        split_group_norm(torch.randn(1, 48, 4, 4), 32, weight=None, bias=None, eps=1e-6)


def test_split_keeps_channels_last_inputs_correct() -> None:
    x, weight, bias = _inputs((2, 64, 8, 8), torch.float32, offset=1.0)
    x = x.to(memory_format=torch.channels_last)
    want = F.group_norm(x, 32, weight, bias, 1e-5)
    torch.testing.assert_close(split_group_norm(x, 32, weight=weight, bias=bias, eps=1e-5), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("offset", [1.0, 30.0])
def test_split_in_half_precision_is_as_accurate_as_pytorch(dtype: torch.dtype, offset: float) -> None:
    """Statistics stay float32: a mean ten standard deviations from zero costs no accuracy."""
    x, weight, bias = _inputs((1, 64, 16, 16), dtype, offset)
    exact = F.group_norm(x.double(), 32, weight.double(), bias.double(), 1e-6)
    ours = (split_group_norm(x, 32, weight=weight, bias=bias, eps=1e-6).double() - exact).abs().max()
    pytorch = (F.group_norm(x, 32, weight, bias, 1e-6).double() - exact).abs().max()
    assert ours <= pytorch * 1.01


def test_group_norm_is_a_drop_in_for_nn_group_norm() -> None:
    reference = nn.GroupNorm(32, 64, eps=1e-6)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.normal_()
    ours = GroupNorm(32, 64, eps=1e-6)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 64, 8, 8)
    assert torch.equal(ours(x), reference(x))  # on the CPU it runs PyTorch's kernel itself
    loss = ours(x).square().sum()
    loss.backward()
    assert ours.weight.grad is not None and ours.weight.grad.abs().sum() > 0


def _long(*, batch: int = 1, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """A decoder-sized activation on the meta device: shapes and dtypes only, no memory."""
    return torch.empty(batch, 128, 1024, 1024, dtype=dtype, device="meta")


@torch.inference_mode()
def test_the_split_is_taken_only_for_long_contiguous_rows_in_inference() -> None:
    assert takes_split(_long(), 32)
    assert takes_split(_long(dtype=torch.bfloat16), 32) and takes_split(_long(dtype=torch.float32), 32)
    row_just_short = torch.empty(1, 32, SPLIT_MIN_ROW - 1, dtype=torch.float16, device="meta")
    assert not takes_split(row_just_short, 32) and takes_split(torch.empty(1, 32, SPLIT_MIN_ROW, device="meta"), 32)
    unet_widest = torch.empty(2, 320, 128, 128, dtype=torch.float16, device="meta")  # SDXL at 1024²
    assert not takes_split(unet_widest, 32)
    assert not takes_split(_long(dtype=torch.float64), 32)  # batch norm wants float32 statistics for it
    assert not takes_split(_long(batch=0), 32)
    assert not takes_split(_long().to(memory_format=torch.channels_last), 32)


def test_the_split_is_not_taken_with_gradients_on() -> None:
    with torch.enable_grad():
        assert not takes_split(_long(), 32)
