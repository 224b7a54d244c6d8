"""GroupNorm that stays fast on the GPU when a few long rows hold all the work (the VAE at 1024²).

PyTorch's CUDA GroupNorm reduces each (sample, group) row in one thread block. A VAE decoder at
batch 1 has 32 such rows of up to 4 M elements, so 32 blocks run on a GPU with over a hundred
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

# Rows shorter than this keep PyTorch's kernel: at the UNets' sizes (at most 164 K elements per
# row for SDXL at 1024²) it is not slower, and the split form launches more kernels, which the
# UNets, bound by launch overhead, would pay for.
SPLIT_MIN_ROW = 1 << 20
# Batch norm's inference kernel parallelises over channels first: with fewer (sample, channel)
# pieces than this, most of an H100's 132 multiprocessors idle (measured: 512 suffice).
MIN_PLANES = 512


def split_group_norm(x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``F.group_norm`` computed as row reductions, then batch norm's inference kernel, in ``x``'s dtype.

    Mean and variance are reduced straight to float32, as PyTorch's kernel keeps them (on CUDA an
    fp16/bf16 input is read and accumulated in one kernel, without a float32 copy): rounded to fp16,
    the mean's error would shift every output by ``|mean| / std`` half-precision steps, and the
    variance would overflow above 65504. The normalisation is batch norm in inference mode, which
    takes float32 statistics and computes in float32, with ``x`` viewed as one batch-norm channel
    per (sample, channel) pair, and long rows cut into at least ``MIN_PLANES`` such pieces.
    """
    n, channels = x.shape[:2]
    rows = x.reshape(n, groups, -1)
    mean = rows.mean(dim=-1, keepdim=True, dtype=torch.float32)
    var = torch.var(rows, dim=-1, correction=0, keepdim=True, out=torch.empty_like(mean))
    pieces = math.gcd(max(1, MIN_PLANES // (n * channels)), x[0, 0].numel())

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


@final
class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys) that takes ``split_group_norm`` for long rows on CUDA.

    The split form is for inference: with gradients on (PyTorch's backward kernel is the tested one)
    and under ``torch.compile`` (which writes its own reduction) PyTorch's op runs.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.is_cuda
            and x[0].numel() // self.num_groups >= SPLIT_MIN_ROW
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
        ):
            return split_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
