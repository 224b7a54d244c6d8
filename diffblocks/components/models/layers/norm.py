"""GroupNorm that stays fast on the GPU when a few long rows hold all the work (the VAE at 1024²).

PyTorch's CUDA GroupNorm reduces each (sample, group) row in one thread block. A VAE decoder at
batch 1 has 32 such rows of up to 8 M elements, so 32 blocks run on a GPU with over a hundred
multiprocessors: on an H100, half of a 1024² decode went to those statistics. Reductions along the
last axis (``mean``, ``var``) spread a long row over many blocks instead, and batch norm's
inference kernel then normalises with those statistics. ``bench/group_norm_gpu.py`` measures both.
"""

from __future__ import annotations

import math
from typing import final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Rows shorter than this keep PyTorch's kernel. The VAE decoder's shortest rows (512 channels at
# 128², 2^18 elements) were already faster split (0.15-0.19 ms against 0.28-0.30 on an H100); the
# UNets' rows (at most 163,840 elements, SDXL at 1024²) stay below, where PyTorch's op is as fast
# and the split form's extra kernel launches would cost the launch-bound UNets.
SPLIT_MIN_ROW = 1 << 18
# Batch norm's inference kernel parallelises over channels first: with fewer (sample, channel)
# pieces than this, most of an H100's 132 multiprocessors idle (measured: 512 suffice).
MIN_PLANES = 512
# The dtypes whose statistics are reduced to float32 (batch norm wants one statistics dtype).
SPLIT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


def split_group_norm(x: Tensor, groups: int, *, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``F.group_norm`` as float32 row reductions, then batch norm's inference kernel, in ``x``'s dtype.

    Mean and variance are reduced straight to float32, as PyTorch's kernel keeps them (on CUDA an
    fp16/bf16 input is read and accumulated in one kernel, without a float32 copy): rounded to fp16,
    the mean's error would shift every output by ``|mean| / std`` half-precision steps, and the
    variance would overflow above 65504. The normalisation is batch norm in inference mode, which
    takes float32 statistics and computes in float32, with ``x`` viewed as one batch-norm channel
    per (sample, channel) pair; rows are cut into equal pieces (a divisor of the spatial size) to
    approach ``MIN_PLANES`` such channels. Inference only: there is no gradient through the
    statistics (``var(out=...)`` refuses autograd, and batch norm treats them as constants).

    Args:
        x: ``(batch, channels, *spatial)`` in fp16, bf16 or fp32.
        groups: number of groups; must divide ``channels``.
        weight: per-channel scale ``(channels,)``, or None.
        bias: per-channel shift ``(channels,)``, or None.
        eps: added to the variance.

    Returns:
        the normalised ``x``, same shape and dtype, contiguous.
    """
    n, channels = x.shape[:2]
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} groups: pick a divisor of {channels}")
    rows = x.reshape(n, groups, -1)
    mean = rows.mean(dim=-1, keepdim=True, dtype=torch.float32)
    var = torch.var(rows, dim=-1, correction=0, keepdim=True, out=torch.empty_like(mean))
    pieces = math.gcd(max(1, MIN_PLANES // (n * channels)), math.prod(x.shape[2:]))

    def per_piece(values: Tensor) -> Tensor:
        """(1 or n, groups or channels, 1) values, repeated for each (sample, channel) piece."""
        per_channel = values.expand(n, -1, channels // values.shape[1]).reshape(n * channels, 1)
        return per_channel.expand(-1, pieces).reshape(-1)

    return F.batch_norm(
        x.reshape(1, n * channels * pieces, -1),
        running_mean=per_piece(mean),
        running_var=per_piece(var + eps),
        weight=None if weight is None else per_piece(weight.float().view(1, channels, 1)),
        bias=None if bias is None else per_piece(bias.float().view(1, channels, 1)),
        training=False,
        # ``running_var`` already holds our eps, and batch norm insists on a positive one of its own:
        # the smallest normal float32 leaves every variance unchanged
        eps=torch.finfo(torch.float32).tiny,
    ).view_as(x)


def takes_split(x: Tensor, groups: int) -> bool:
    """Whether ``GroupNorm`` normalises ``x`` with ``split_group_norm`` (on CUDA; any device is asked).

    Long rows of a contiguous fp16/bf16/fp32 batch, in inference outside ``torch.compile``: under
    compile inductor writes its own reductions, and with gradients on PyTorch's op (which has a
    backward) runs. A non-contiguous ``x`` keeps PyTorch's op too, which also keeps its memory format.
    """
    return (
        x.shape[0] > 0
        and math.prod(x.shape[1:]) // groups >= SPLIT_MIN_ROW
        and x.dtype in SPLIT_DTYPES
        and x.is_contiguous()
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


@final
class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys) that takes ``split_group_norm`` for long rows on CUDA."""

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and takes_split(x, self.num_groups):
            return split_group_norm(x, self.num_groups, weight=self.weight, bias=self.bias, eps=self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
