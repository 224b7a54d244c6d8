"""The UNet and its ControlNets embed timesteps and SDXL's text-time pair with one set of modules and one check."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from diffblocks.components.models.controlnet import ControlNetModel, ControlNetParams, ControlNetUnionModel, ControlNetUnionParams
from diffblocks.components.models.unet import UNet2DConditionModel, UNet2DConditionParams
from diffblocks.components.models.unet.embeddings import batch_timesteps, time_embeddings

SDXL = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            attention_head_dim=(2, 4), cross_attention_dim=16, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 12)  # fmt: skip
UNION = dict(num_control_type=2, num_trans_channel=32, num_trans_head=4, num_proj_channel=32, conditioning_embedding_out_channels=(16, 32))


def _unet() -> tuple[nn.Module, Callable[..., Tensor | tuple[Tensor, ...]]]:
    net = UNet2DConditionModel(UNet2DConditionParams(up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), **SDXL))
    return net, lambda x, text, added: net(x, 1, text, added_cond_kwargs=added)


def _controlnet() -> tuple[nn.Module, Callable[..., Tensor | tuple[Tensor, ...]]]:
    net = ControlNetModel(ControlNetParams(conditioning_embedding_out_channels=(16, 32), **SDXL))
    return net, lambda x, text, added: net(x, 1, text, torch.rand(1, 3, 16, 16), added_cond_kwargs=added)


def _union() -> tuple[nn.Module, Callable[..., Tensor | tuple[Tensor, ...]]]:
    net = ControlNetUnionModel(ControlNetUnionParams(**SDXL, **UNION))
    return net, lambda x, text, added: net(x, 1, text, [torch.rand(1, 3, 16, 16)], torch.tensor([[1.0, 0.0]]), [0], added_cond_kwargs=added)


MODELS = {"UNet": _unet, "ControlNet": _controlnet, "ControlNet-Union": _union}


@pytest.mark.parametrize("name", list(MODELS))
def test_missing_text_time_inputs_name_the_model_and_the_keys(name: str) -> None:
    _, call = MODELS[name]()
    x, text = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16)
    with pytest.raises(ValueError, match=rf"this {name} uses SDXL's text-time conditioning: .* got None"):
        call(x, text, None)
    with pytest.raises(ValueError, match=rf"this {name} uses SDXL's text-time conditioning: .* got \['text_embeds'\]"):
        call(x, text, {"text_embeds": torch.randn(1, 12)})


@pytest.mark.parametrize("name", list(MODELS))
def test_text_time_widths_that_do_not_add_up_are_refused(name: str) -> None:
    _, call = MODELS[name]()
    added = {"text_embeds": torch.randn(1, 10), "time_ids": torch.randn(1, 6)}
    with pytest.raises(ValueError, match=r"text_embeds \(1, 10\) and time_ids \(1, 6\) give 58 features but projection_class_embeddings_input_dim is 60"):
        call(torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16), added)


@pytest.mark.parametrize("name", list(MODELS))
def test_time_modules_keep_their_names_and_order(name: str) -> None:
    net, call = MODELS[name]()
    names = [n for n, _ in net.named_children()]
    assert names[names.index("time_proj") :][:4] == ["time_proj", "time_embedding", "add_time_proj", "add_embedding"]
    call(torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16), {"text_embeds": torch.randn(1, 12), "time_ids": torch.randn(1, 6)})


def test_time_embeddings_without_text_time_have_no_sdxl_pair() -> None:
    proj, embedding, add_proj, add_embedding = time_embeddings(UNet2DConditionParams(block_out_channels=(32, 32, 32, 64)))
    assert (proj.dim, embedding.linear_2.out_features, add_proj, add_embedding) == (32, 128, None, None)


def test_batch_timesteps_gives_one_per_item() -> None:
    sample = torch.zeros(3, 4, 2, 2)
    for timestep in (7, 7.0, torch.tensor(7), torch.tensor([7])):
        assert batch_timesteps(timestep, sample).tolist() == [7, 7, 7]
