"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), as in SD, SDXL and Flux."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar, final

import torch
from jaxtyping import Float
from torch import Tensor, nn

from diffblocks.components.models.autoencoder_kl.coders import Decoder, Encoder
from diffblocks.components.models.autoencoder_kl.distribution import DiagonalGaussian
from diffblocks.components.models.autoencoder_kl.params import AUTOENCODER_KL_FIXED_CONFIG, AutoencoderKLParams
from diffblocks.components.models.autoencoder_kl.tiling import VaeTiling, tiled_map
from diffblocks.components.models.base import AbstractModel
from diffblocks.components.noise import Generator


@final
class AutoencoderKL(AbstractModel[AutoencoderKLParams]):
    """Encode images to a latent Gaussian and decode latents to images.

    Parameter names equal diffusers' ``AutoencoderKL``. Two memory savers, off by default, can be
    switched at any time: ``tiling`` (a :class:`VaeTiling`; inputs larger than a tile are processed
    in overlapping tiles) and ``slicing`` (process the batch one image at a time).

    Args:
        params: the architecture; build from a diffusers config with :meth:`from_config`.

    Example:
        >>> vae = AutoencoderKL(AutoencoderKLParams(block_out_channels=(32, 32),
        ...     down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2))
        >>> z = vae.encode(torch.randn(1, 3, 16, 16)).mode()
        >>> z.shape, vae.decode(z).shape
        (torch.Size([1, 4, 8, 8]), torch.Size([1, 3, 16, 16]))
    """

    Params = AutoencoderKLParams
    diffusers_class_name = "AutoencoderKL"
    fixed_config: ClassVar[Mapping[str, object]] = AUTOENCODER_KL_FIXED_CONFIG

    def __init__(self, params: AutoencoderKLParams) -> None:
        super().__init__(params)
        moments = 2 * params.latent_channels
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.quant_conv = nn.Conv2d(moments, moments, 1) if params.use_quant_conv else None
        self.post_quant_conv = (
            nn.Conv2d(params.latent_channels, params.latent_channels, 1) if params.use_post_quant_conv else None
        )
        self.tiling: VaeTiling | None = None
        self.slicing = False

    @property
    def scaling_factor(self) -> float:
        return self.params.scaling_factor

    @property
    def shift_factor(self) -> float | None:
        return self.params.shift_factor

    @property
    def force_upcast(self) -> bool:
        """The checkpoint overflows in float16: run it in float32 when the pipeline runs in float16."""
        return self.params.force_upcast

    def encode(self, x: Float[Tensor, "batch c_img height width"]) -> DiagonalGaussian:
        """The posterior over latents of images in [-1, 1]."""
        return DiagonalGaussian.from_moments(self._per_item(x, self._encode))

    def decode(self, z: Float[Tensor, "batch latent h w"]) -> Float[Tensor, "batch c_img height width"]:
        """Images (roughly in [-1, 1]) from raw latents; undo :meth:`normalize_latents` first."""
        return self._per_item(z, self._decode)

    def forward(
        self,
        sample: Float[Tensor, "batch c_img height width"],
        *,
        sample_posterior: bool = False,
        generator: Generator | None = None,
    ) -> Float[Tensor, "batch c_img height width"]:
        """Reconstruct ``sample`` through the posterior's mode (or a sample of it)."""
        posterior = self.encode(sample)
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode())

    def normalize_latents(self, z: Tensor) -> Tensor:
        """Raw latents to the unit-variance space the denoiser works in (after encoding)."""
        p = self.params
        stats = self._latent_stats(z)
        if stats is not None:
            mean, std = stats
            return (z - mean) * p.scaling_factor / std
        if p.shift_factor is not None:
            z = z - p.shift_factor
        return z * p.scaling_factor

    def denormalize_latents(self, z: Tensor) -> Tensor:
        """Denoiser latents back to raw latents (before decoding); the inverse of :meth:`normalize_latents`."""
        p = self.params
        stats = self._latent_stats(z)
        if stats is not None:
            mean, std = stats
            return z * std / p.scaling_factor + mean
        z = z / p.scaling_factor
        return z + p.shift_factor if p.shift_factor is not None else z

    def _latent_stats(self, z: Tensor) -> tuple[Tensor, Tensor] | None:
        """Per-channel ``latents_mean`` and ``latents_std`` shaped to broadcast over ``z``, if configured."""
        p = self.params
        if p.latents_mean is None or p.latents_std is None:
            return None
        mean = torch.tensor(p.latents_mean, device=z.device, dtype=z.dtype)[:, None, None]
        return mean, torch.tensor(p.latents_std, device=z.device, dtype=z.dtype)[:, None, None]

    def _per_item(self, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        if self.slicing and x.shape[0] > 1:
            return torch.cat([fn(item) for item in x.split(1)])
        return fn(x)

    def _tiles(self) -> tuple[int, int, float] | None:
        """(pixel tile, latent tile, overlap) when tiling is on."""
        if self.tiling is None:
            return None
        pixels = self.tiling.tile_sample_size or self.params.tile_sample_size
        return pixels, int(pixels / self.params.downscale), self.tiling.overlap

    def _encode(self, x: Tensor) -> Tensor:
        tiles = self._tiles()
        if tiles is not None and max(x.shape[-2:]) > tiles[0]:
            return tiled_map(x, self._encode_tile, tile_in=tiles[0], tile_out=tiles[1], overlap=tiles[2])
        return self._encode_tile(x)

    def _encode_tile(self, x: Tensor) -> Tensor:
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def _decode(self, z: Tensor) -> Tensor:
        tiles = self._tiles()
        if tiles is not None and max(z.shape[-2:]) > tiles[1]:
            return tiled_map(z, self._decode_tile, tile_in=tiles[1], tile_out=tiles[0], overlap=tiles[2])
        return self._decode_tile(z)

    def _decode_tile(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


__all__ = ["AutoencoderKL"]
