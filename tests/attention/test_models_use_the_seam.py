"""Every attention layer of our models runs through ``attention()``: a backend chosen there reaches all of them."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from diffblocks.components.attention import attention_backend
from diffblocks.components.models.autoencoder_kl import AutoencoderKL
from diffblocks.components.models.flux import FluxTransformer2DModel, prepare_image_ids, prepare_text_ids
from diffblocks.components.models.flux.layers import JointAttention, SelfAttention
from diffblocks.components.models.layers.attention import Attention, SpatialSelfAttention
from diffblocks.components.models.unet import UNet2DConditionModel
from tests.attention.attention_helpers import CountingBackend

ATTENTION_LAYERS = (Attention, SpatialSelfAttention, SelfAttention, JointAttention)
Build = Callable[[], tuple[nn.Module, Callable[[nn.Module], Tensor]]]


def _unet() -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    model = UNet2DConditionModel.from_config(
        dict(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=16, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32,
        )
    )
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    return model, lambda m: m(x, torch.tensor(10.0), context)


def _vae() -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    model = AutoencoderKL.from_config(
        dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    )
    image = torch.randn(1, 3, 16, 16)
    return model, lambda m: m.decode(m.encode(image).mode())


def _flux() -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    model = FluxTransformer2DModel.from_config(
        dict(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
        )
    )
    kwargs = dict(
        encoder_hidden_states=torch.randn(1, 5, 32), pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
        img_ids=prepare_image_ids(4, 3), txt_ids=prepare_text_ids(5),
    )
    x = torch.randn(1, 12, 16)
    return model, lambda m: m(x, **kwargs)


@pytest.mark.parametrize("build", [_unet, _vae, _flux], ids=["unet", "vae", "flux"])
@torch.no_grad()
def test_each_attention_layer_calls_the_seam_once_per_forward(build: Build) -> None:
    torch.manual_seed(0)
    model, run = build()
    model.eval()
    layers = sum(isinstance(module, ATTENTION_LAYERS) for module in model.modules())
    assert layers > 0
    expected = run(model)
    CountingBackend.calls = 0
    with attention_backend("test_counting"):
        out = run(model)
    assert CountingBackend.calls == layers
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
