"""Hyper-parameters of the KL autoencoder, named like diffusers' ``AutoencoderKL`` config."""

from __future__ import annotations

from typing import Literal, final

from pydantic import model_validator
from typing_extensions import Self

from diffblocks.components.models.base import AbstractParams

AUTOENCODER_KL_FIXED_CONFIG: dict[str, object] = {"act_fn": "silu"}


@final
class AutoencoderKLParams(AbstractParams):
    """AutoencoderKL architecture and latent statistics (SD1.x/2.x, SDXL, Flux configs).

    ``scaling_factor``, ``shift_factor`` and ``latents_mean``/``latents_std`` do not change the
    network; they say how its latents are normalised for the denoiser (see
    :meth:`AutoencoderKL.normalize_latents`).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[Literal["DownEncoderBlock2D"], ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[Literal["UpDecoderBlock2D"], ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for the SD, SDXL and Flux autoencoders)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def tile_sample_size(self) -> int:
        """Default tile side in pixels: ``sample_size`` (its first entry when a pair)."""
        return self.sample_size[0] if isinstance(self.sample_size, tuple) else self.sample_size

    @model_validator(mode="after")
    def _check(self) -> Self:
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries but block_out_channels has {n}")
        for i, channels in enumerate(self.block_out_channels):
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"norm_num_groups {self.norm_num_groups} does not divide block_out_channels[{i}] {channels}"
                )
        for name in ("latents_mean", "latents_std"):
            stats = getattr(self, name)
            if stats is not None and len(stats) != self.latent_channels:
                raise ValueError(f"{name} has {len(stats)} entries but latent_channels is {self.latent_channels}")
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("latents_mean and latents_std must be given together")
        if self.scaling_factor == 0:
            raise ValueError("scaling_factor must be non-zero")
        return self


__all__ = ["AUTOENCODER_KL_FIXED_CONFIG", "AutoencoderKLParams"]
