"""Original single-file ControlNets (``control_model.*`` keys): our table against diffusers' own converter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from diffblocks.components.models.controlnet import ControlNetModel
from diffblocks.components.models.single_file import CONTROL
from diffblocks.components.models.single_file.controlnet import infer_controlnet
from tests.controlnet.test_controlnet import SD15_NET, SDXL_NET, tiny_controlnet
from tests.models.single_file_fixtures import original_state

# the released hint encoder (diffusers' converter reads it at its fixed indices 0..14)
HINT = dict(conditioning_embedding_out_channels=(16, 32, 96, 256))


def original_file(folder: Path, path: Path, prefix: str) -> Path:
    """The diffusers ControlNet in ``folder`` written in the original layout, by undoing our table."""
    import diffusers

    net = diffusers.ControlNetModel.from_pretrained(folder)
    state = original_state(CONTROL.parts[0], prefix, net.state_dict(), dict(net.config))
    save_file({key: tensor.detach().clone().contiguous() for key, tensor in state.items()}, str(path))
    return path


def residuals(net: Any, config: dict[str, Any], *, diffusers_net: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    batch, width = 1, config["cross_attention_dim"]
    x, text, image = torch.randn(batch, 4, 8, 8), torch.randn(batch, 7, width), torch.rand(batch, 3, 64, 64)
    added = {"text_embeds": torch.randn(batch, 32), "time_ids": torch.randn(batch, 6)} if "addition_embed_type" in config else None
    with torch.no_grad():
        if diffusers_net:
            down, mid = net(x, torch.tensor(300), text, image, added_cond_kwargs=added, return_dict=False)
            return [*down, mid]
        return list(net(x, torch.tensor(300), text, image, added_cond_kwargs=added))


@pytest.mark.parametrize("prefix", ["control_model.", ""], ids=["in_a_checkpoint", "alone"])
def test_sd15_file_loads_as_diffusers_reads_it(tmp_path: Path, prefix: str) -> None:
    import diffusers

    folder = tiny_controlnet(tmp_path / "net", **SD15_NET, **HINT)
    path = original_file(folder, tmp_path / "control_v11p_sd15_tiny.safetensors", prefix)
    ref = diffusers.ControlNetModel.from_single_file(str(path), config=str(folder)).eval()  # their converter, not ours
    ours = ControlNetModel.from_single_file(path)  # config inferred from the file's shapes
    assert ours.params.conditioning_embedding_out_channels == HINT["conditioning_embedding_out_channels"]
    for a, b in zip(residuals(ours, SD15_NET, diffusers_net=False), residuals(ref, SD15_NET, diffusers_net=True), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_sdxl_file_infers_its_config(tmp_path: Path) -> None:
    import diffusers

    folder = tiny_controlnet(tmp_path / "net", **SDXL_NET, **HINT)
    path = original_file(folder, tmp_path / "controlnet_sdxl.safetensors", "control_model.")
    ref = diffusers.ControlNetModel.from_pretrained(folder).eval()
    # heads (64 channels each) and the time ids' width (256) follow the releases: this tiny net needs its config
    ours = ControlNetModel.from_single_file(path, config={**dict(ref.config), "_class_name": "ControlNetModel"})
    inferred = ControlNetModel.from_single_file(path, config=None).params
    assert (inferred.addition_embed_type, inferred.use_linear_projection, inferred.transformer_layers_per_block) == ("text_time", True, (1, 2))
    for a, b in zip(residuals(ours, SDXL_NET, diffusers_net=False), residuals(ref, SDXL_NET, diffusers_net=True), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_small_hint_encoder_is_placed_by_its_width_count(tmp_path: Path) -> None:
    folder = tiny_controlnet(tmp_path / "net", **SD15_NET)  # two widths: conv_out is input_hint_block.6, not .14
    path = original_file(folder, tmp_path / "net.safetensors", "control_model.")
    ours = ControlNetModel.from_single_file(path)
    ref = ControlNetModel.from_pretrained(folder)
    assert ours.params.conditioning_embedding_out_channels == (16, 32)
    for key, tensor in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], tensor), key


def test_infer_reads_the_hint_encoder_widths() -> None:
    shapes = {f"input_hint_block.{i}.weight": (w, c, 3, 3) for i, (w, c) in
              enumerate([(16, 1), (16, 16), (32, 16), (32, 32), (96, 32), (96, 96), (256, 96), (320, 256)])}  # fmt: skip
    shapes = {key.replace(key.split(".")[1], str(2 * int(key.split(".")[1]))): shape for key, shape in shapes.items()}
    shapes.update({"input_blocks.0.0.weight": (32, 4, 3, 3), "input_blocks.1.0.out_layers.3.weight": (32, 32, 3, 3),
                   "input_blocks.1.1.proj_in.weight": (32, 32, 1, 1), "x.attn2.to_k.weight": (32, 768)})  # fmt: skip
    config = infer_controlnet(shapes)
    assert config["conditioning_embedding_out_channels"] == (16, 32, 96, 256) and config["conditioning_channels"] == 1


def test_a_file_that_is_no_controlnet_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    with pytest.raises(ValueError, match=r"no known layout for ControlNetModel.*lacks .*input_hint_block\.0\.weight"):
        ControlNetModel.from_single_file(path)
