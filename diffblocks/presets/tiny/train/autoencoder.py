"""Stage 1: the factor-4 KL autoencoder, then its latents of the whole dataset, normalised per channel."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from diffblocks.components.models.autoencoder_kl import AutoencoderKL
from diffblocks.presets.tiny.architecture import VAE_CONFIG, new_vae
from diffblocks.presets.tiny.train.schedule import Budget, param_groups

logger = logging.getLogger(__name__)


def to_pixels(images: Tensor) -> Tensor:
    """uint8 (batch, 64, 64, 3) to float (batch, 3, 64, 64) in [-1, 1], the range the VAE encodes."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _edges(x: Tensor) -> tuple[Tensor, Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def reconstruction_loss(recon: Tensor, target: Tensor) -> Tensor:
    """L1 + MSE on pixels, plus L1 on finite differences, which keeps shape edges sharp."""
    loss = F.l1_loss(recon, target) + F.mse_loss(recon, target)
    for a, b in zip(_edges(recon), _edges(target)):
        loss = loss + 0.5 * F.l1_loss(a, b)
    return loss


def train_autoencoder(
    images: Tensor,
    *,
    budget: Budget,
    batch_size: int,
    lr: float,
    kl_weight: float,
    generator: torch.Generator,
    autocast: torch.dtype | None,
    log: Callable[[str], None],
) -> AutoencoderKL:
    """Train the autoencoder on uint8 images (any device) with the posterior sampled, as in latent diffusion.

    Args:
        images: uint8 (n, 64, 64, 3), on the training device.
        budget: when to stop; also shapes the learning rate.
        batch_size: images per step.
        lr: peak learning rate (AdamW).
        kl_weight: weight of the mean KL to the unit Gaussian (small: it only keeps latents bounded).
        generator: on the training device; draws batches and posterior samples.
        autocast: a reduced precision for the forward pass, or None for float32.
        log: progress lines.
    """
    device = images.device
    vae = new_vae().to(device).train()
    groups = param_groups(vae, 1e-4)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=device.type == "cuda")  # type: ignore[arg-type]
    while not budget.done():
        for group in optimizer.param_groups:
            group["lr"] = lr * budget.lr_factor()
        index = torch.randint(len(images), (batch_size,), device=device, generator=generator)
        target = to_pixels(images[index])
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            posterior = vae.encode(target)
            recon = vae.decode(posterior.sample(generator))
        rec = reconstruction_loss(recon.float(), target)
        kl = _kl(posterior.mean, posterior.logvar)
        loss = rec + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        budget.step += 1
        if budget.step % 200 == 0 or budget.step == 1:
            lr_now = optimizer.param_groups[0]["lr"]
            log(f"vae step {budget.step} {budget.elapsed:.0f}s rec {rec.item():.4f} kl {kl.item():.2f} lr {lr_now:.2e}")
    return vae.eval()


def _kl(mean: Tensor, logvar: Tensor) -> Tensor:
    return 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).mean()


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, images: Tensor, *, batch_size: int = 2048) -> Tensor:
    """Raw latents (posterior means) of uint8 images, float32 (n, 4, 16, 16) on the images' device."""
    chunks = [vae.encode(to_pixels(images[i : i + batch_size])).mode() for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


def with_latent_stats(vae: AutoencoderKL, latents: Tensor) -> AutoencoderKL:
    """A copy of ``vae`` whose config normalises latents per channel to zero mean, unit std (``latents_mean/std``)."""
    mean = latents.mean(dim=(0, 2, 3)).tolist()
    std = latents.std(dim=(0, 2, 3)).tolist()
    config = {**VAE_CONFIG, "latents_mean": mean, "latents_std": std, "scaling_factor": 1.0, "shift_factor": None}
    normalised = AutoencoderKL.from_config(config).to(latents.device)
    normalised.load_state_dict(vae.state_dict())
    return normalised.eval()
