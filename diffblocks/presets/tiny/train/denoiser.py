"""Stage 2: the denoiser, trained by rectified flow on normalised latents with caption dropout.

Liu et al. (2022), "Flow Straight and Fast"; Lipman et al. (2022), "Flow Matching": along the
straight path ``x_t = (1 - sigma) x_0 + sigma * noise`` the model learns the velocity
``noise - x_0``, which ``FlowMatchEulerDiscreteScheduler`` integrates at inference. Noise levels
are drawn from a logit-normal (Esser et al. 2024, SD3), mixed with a uniform share so the ends of
the path are trained too. Dropped captions become the empty prompt: the unconditional branch of
classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from diffblocks.components.models.unet import UNet2DConditionModel
from diffblocks.components.schedulers import FlowMatchEulerDiscreteScheduler
from diffblocks.presets.tiny.architecture import new_unet
from diffblocks.presets.tiny.train.schedule import EMA, Budget, param_groups


@dataclass(frozen=True)
class TextFeatures:
    """Token states (n, 32, 384) and masks (n, 32) of the captions, and of the empty prompt (1, ...)."""

    tokens: Tensor
    mask: Tensor
    empty_tokens: Tensor
    empty_mask: Tensor


def flow_interpolate(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """The straight path's point at noise level ``sigma`` (one per item): the scheduler's ``add_noise``, per item."""
    sigma = sigma.view(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - sigma) * x0 + sigma * noise


def sample_sigmas(n: int, *, generator: torch.Generator, device: torch.device, uniform_share: float = 0.1) -> Tensor:
    """Noise levels in (0, 1): ``sigmoid(N(0, 1))``, with a ``uniform_share`` of them uniform."""
    logit_normal = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    uniform = torch.rand(n, generator=generator, device=device)
    pick = torch.rand(n, generator=generator, device=device) < uniform_share
    return torch.where(pick, uniform, logit_normal).clamp(1e-4, 1.0)


def train_denoiser(
    latents: Tensor,
    text: TextFeatures,
    *,
    scheduler: FlowMatchEulerDiscreteScheduler,
    budget: Budget,
    batch_size: int,
    lr: float,
    caption_dropout: float,
    ema_decay: float,
    generator: torch.Generator,
    autocast: torch.dtype | None,
    log: Callable[[str], None],
    checkpoint: Callable[[UNet2DConditionModel, EMA], None] | None = None,
    checkpoint_every: float = 120.0,
    init: UNet2DConditionModel | None = None,
) -> tuple[UNet2DConditionModel, EMA]:
    """Train the denoiser; returns the trained model and its EMA.

    Args:
        latents: normalised latents (n, 4, 16, 16) on the training device (any float dtype).
        text: the captions' features, row ``i`` for latent ``i``, on the training device.
        scheduler: gives the timestep scale (``t = num_train_timesteps * sigma``).
        budget: when to stop; also shapes the learning rate.
        batch_size: samples per step.
        lr: peak learning rate (AdamW).
        caption_dropout: probability of replacing a caption by the empty prompt.
        ema_decay: EMA decay of the weights that are shipped.
        generator: on the training device; draws batches, noise levels, noise and dropout.
        autocast: a reduced precision for the forward pass (inputs are cast to it so the attention
            mask matches), or None for float32.
        log: progress lines.
        checkpoint: called with the model and EMA every ``checkpoint_every`` seconds.
        checkpoint_every: seconds between checkpoints.
        init: weights to start from (fine-tuning); a fresh model when None.
    """
    device = latents.device
    unet = (init if init is not None else new_unet()).to(device, torch.float32).train()
    ema = EMA(unet, decay=ema_decay)
    groups = param_groups(unet, 0.01)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=device.type == "cuda")  # type: ignore[arg-type]
    compute = autocast or torch.float32
    last_checkpoint, running = budget.elapsed, 0.0
    while not budget.done():
        for group in optimizer.param_groups:
            group["lr"] = lr * budget.lr_factor()
        index = torch.randint(len(latents), (batch_size,), device=device, generator=generator)
        x0 = latents[index].float()
        tokens, mask = text.tokens[index], text.mask[index]
        drop = torch.rand(batch_size, device=device, generator=generator) < caption_dropout
        tokens = torch.where(drop[:, None, None], text.empty_tokens, tokens)
        mask = torch.where(drop[:, None], text.empty_mask, mask)
        noise = torch.randn(x0.shape, device=device, generator=generator)
        sigma = sample_sigmas(batch_size, generator=generator, device=device)
        x_t = flow_interpolate(x0, noise, sigma)
        t = sigma * scheduler.num_train_timesteps
        with torch.autocast(device.type, dtype=compute, enabled=autocast is not None):
            prediction = unet(x_t.to(compute), t, tokens.to(compute), encoder_attention_mask=mask)
        loss = F.mse_loss(prediction.float(), noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        ema.update(unet)
        budget.step += 1
        if budget.step % 10 == 0 or budget.step == 1:  # reading the loss waits for the device: not every step
            running = loss.item() if budget.step == 1 else 0.9 * running + 0.1 * loss.item()
        if budget.step % 500 == 0 or budget.step == 1:
            lr_now = optimizer.param_groups[0]["lr"]
            log(f"unet step {budget.step} {budget.elapsed:.0f}s loss {running:.4f} lr {lr_now:.2e}")
        if checkpoint is not None and budget.elapsed - last_checkpoint > checkpoint_every:
            checkpoint(unet, ema)
            last_checkpoint = budget.elapsed
    return unet.eval(), ema
