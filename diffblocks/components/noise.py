"""Seeded Gaussian noise, drawn exactly as diffusers draws it so the same generator gives the same latents."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Generator = torch.Generator | Sequence[torch.Generator]


def check_generator_device(generator: Generator | None, device: torch.device | str) -> None:
    """Raise before any work when a generator lives on a device noise cannot be drawn for.

    A CPU generator works for every target device (noise is drawn on the CPU and moved, which is
    what makes CPU and GPU runs reproduce each other); an accelerator generator only works for its
    own device type.
    """
    device = torch.device(device)
    gens = generator if isinstance(generator, Sequence) else [generator] if generator is not None else []
    for gen in gens:
        if gen.device.type not in ("cpu", device.type):
            raise ValueError(
                f"generator is on {gen.device.type!r} but the noise is for {device.type!r}: "
                f"create it with torch.Generator(device='cpu') (portable) or device={device.type!r}."
            )


def randn_tensor(
    shape: Sequence[int],
    *,
    generator: Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise of ``shape`` on ``device``.

    Args:
        shape: output shape; the first dimension is the batch.
        generator: one generator for the whole batch, or a list with one per batch item.
        device: where the result lives. Noise is drawn on the generator's device, then moved.
        dtype: result dtype.
    """
    device = torch.device(device)
    check_generator_device(generator, device)
    if isinstance(generator, Sequence) and not isinstance(generator, torch.Generator):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one per item.")
        draws = [
            torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype).to(device) for g in generator
        ]
        return torch.cat(draws, dim=0)
    draw_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)
