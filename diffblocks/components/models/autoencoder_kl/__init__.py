"""The KL autoencoder of SD, SDXL and Flux (diffusers ``AutoencoderKL`` compatible)."""

from diffblocks.components.models.autoencoder_kl.distribution import DiagonalGaussian
from diffblocks.components.models.autoencoder_kl.model import AutoencoderKL
from diffblocks.components.models.autoencoder_kl.params import AutoencoderKLParams
from diffblocks.components.models.autoencoder_kl.tiling import VaeTiling

__all__ = ["AutoencoderKL", "AutoencoderKLParams", "DiagonalGaussian", "VaeTiling"]
