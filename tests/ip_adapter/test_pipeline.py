"""IP-Adapter in a pipeline: every workflow and guider, with ControlNet, precomputed embeddings, unloading, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionModelWithProjection

from diffblocks.blocks import InputError, Pipeline
from diffblocks.blocks.standard.ip_adapter import EncodeImagePrompt
from diffblocks.components.guiders import PerturbedAttentionGuidance
from diffblocks.components.models.ip_adapter import IPAdapterModel, load_ip_adapter_file
from tests.ip_adapter.ip_files import SIZE, image_encoder, picture

KWARGS: dict[str, Any] = dict(prompt="a red circle", height=SIZE, width=SIZE, num_inference_steps=2, output_type="np", progress=False)


def run(pipe: Pipeline, **kwargs: Any) -> np.ndarray:
    return pipe(**{**KWARGS, **kwargs}, generator=torch.Generator().manual_seed(5)).images


def loaded(repo: Path, ip: Path, weight_name: str = "plain.safetensors", **options: Any) -> Pipeline:
    pipe = Pipeline.from_pretrained(str(repo))
    pipe.load_ip_adapter(str(ip), subfolder="models", weight_name=weight_name, **options)
    return pipe


def test_unload_gives_the_pipeline_back_exactly(sd15: tuple[Path, Path]) -> None:
    repo, ip = sd15
    pipe = Pipeline.from_pretrained(str(repo))
    unet = pipe.components["unet"]
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    tree, plain = repr(pipe.blocks), run(pipe)
    pipe.load_ip_adapter(str(ip), subfolder="models", weight_name="plus.safetensors")
    assert {"ip_adapter", "image_encoder"} <= set(pipe.components) and "ip_adapter_image" in pipe.input_names
    assert pipe.blocks.get("workflow.text2img").names[-3:] == ("encode_image_prompt", "prepare_guidance", "denoise")
    assert np.abs(run(pipe, ip_adapter_image=picture()) - plain).max() > 1e-3
    assert np.array_equal(run(pipe), plain)  # no image prompt: the plain UNet
    pipe.unload_ip_adapter()
    assert repr(pipe.blocks) == tree and not {"ip_adapter", "image_encoder"} & set(pipe.components)
    assert pipe.components["unet"] is unet and all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert np.array_equal(run(pipe), plain)


@pytest.mark.parametrize("workflow", ["img2img", "inpaint"])
def test_img2img_and_inpaint(sd15: tuple[Path, Path], workflow: str) -> None:
    repo, ip = sd15
    pipe = loaded(repo, ip)
    extra: dict[str, Any] = {"image": picture(4), "strength": 0.8}
    if workflow == "inpaint":
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        mask[8:24, 8:24] = 255
        extra["mask_image"] = mask
    out = pipe(**{**KWARGS, **extra}, ip_adapter_image=picture(), generator=torch.Generator().manual_seed(5))
    plain = pipe(**{**KWARGS, **extra}, generator=torch.Generator().manual_seed(5))
    assert out.workflow == workflow and np.abs(out.images - plain.images).max() > 1e-3


def test_any_guider_and_several_prompts(sd15: tuple[Path, Path]) -> None:
    repo, ip = sd15
    pipe = loaded(repo, ip)
    pipe.update_components(guider=PerturbedAttentionGuidance(guidance_scale=5.0, perturbed_guidance_scale=2.0,
                                                             perturbed_guidance_layers=("mid_block.attentions.0",)))  # fmt: skip
    out = run(pipe, prompt=["a", "b"], num_images_per_prompt=2, ip_adapter_image=picture())
    assert out.shape == (4, SIZE, SIZE, 3) and np.isfinite(out).all()


def test_with_controlnet(sd15: tuple[Path, Path], tmp_path: Path) -> None:
    from diffblocks.components.models.controlnet import ControlNetModel
    from diffblocks.presets.controlnet import with_controlnet

    repo, ip = sd15
    net = ControlNetModel.from_config({"block_out_channels": (32, 64), "layers_per_block": 1, "cross_attention_dim": 32,
                                       "attention_head_dim": 8, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                                       "conditioning_embedding_out_channels": (16, 32)}).eval()  # fmt: skip
    pipe = with_controlnet(Pipeline.from_pretrained(str(repo)), net)
    pipe.load_ip_adapter(str(ip), subfolder="models", weight_name="plain.safetensors")
    with_image, without = run(pipe, control_image=picture(1), ip_adapter_image=picture()), run(pipe, control_image=picture(1))
    assert np.abs(with_image - without).max() > 1e-3


def test_precomputed_embeds_give_the_same_image(sd15: tuple[Path, Path]) -> None:
    repo, ip = sd15
    for weight_name in ("plain.safetensors", "plus.safetensors"):
        pipe = loaded(repo, ip, weight_name)
        encoder, adapter = pipe.components["image_encoder"], pipe.components["ip_adapter"]
        assert isinstance(encoder, CLIPVisionModelWithProjection) and isinstance(adapter, IPAdapterModel)
        block = EncodeImagePrompt()
        block.bind({"image_encoder": encoder, "ip_adapter": adapter})
        from diffblocks.blocks.standard.ip_adapter import clip_pixels

        with torch.no_grad():
            pixels = clip_pixels(picture(), size=SIZE)
            embeds = block.encode(pixels, hidden=adapter.reads_hidden_states)
            negative = block.encode(torch.zeros_like(pixels), hidden=True) if adapter.reads_hidden_states else torch.zeros_like(embeds)
        expected = run(pipe, ip_adapter_image=picture())
        given = run(pipe, ip_adapter_image_embeds=[embeds], negative_ip_adapter_image_embeds=[negative])
        assert np.abs(given - expected).max() < 1e-6
        if not adapter.reads_hidden_states:  # zeros are the default negative of the plain adapter
            assert np.abs(run(pipe, ip_adapter_image_embeds=[embeds]) - expected).max() < 1e-6


def test_by_value_and_pickle_opt_in(sd15: tuple[Path, Path], tmp_path: Path) -> None:
    repo, ip = sd15
    adapter = load_ip_adapter_file(ip / "models" / "plain.safetensors")
    encoder = CLIPVisionModelWithProjection.from_pretrained(ip / "models" / "image_encoder")
    pipe = Pipeline.from_pretrained(str(repo))
    pipe.load_ip_adapter(adapter, image_encoder=encoder)
    expected = run(loaded(repo, ip), ip_adapter_image=picture())
    assert np.array_equal(run(pipe, ip_adapter_image=picture()), expected)

    nested = {"image_proj": {}, "ip_adapter": {}}
    for key, value in adapter.state_dict().items():
        part, name = key.split(".", 1)
        nested[part][name] = value
    torch.save(nested, tmp_path / "ip-adapter.bin")  # the original release's layout
    with pytest.raises(ValueError, match="pickled file"):
        pipe.load_ip_adapter(str(tmp_path / "ip-adapter.bin"))
    pipe.load_ip_adapter(str(tmp_path), weight_name="ip-adapter.bin", allow_pickle=True)
    assert np.array_equal(run(pipe, ip_adapter_image=picture()), expected)  # the image encoder loaded before stays


def test_image_without_an_encoder_is_refused_at_check_time(sd15: tuple[Path, Path]) -> None:
    repo, ip = sd15
    pipe = Pipeline.from_pretrained(str(repo))
    pipe.load_ip_adapter(load_ip_adapter_file(ip / "models" / "plain.safetensors"))
    assert "image_encoder" not in pipe.components
    with pytest.raises(InputError, match="ip_adapter_image is given but no image encoder is loaded"):
        run(pipe, ip_adapter_image=picture())
    with pytest.raises(InputError, match=r"ip_adapter_image_embeds\[0\] has shape \(1, 7\), but IP-Adapter 0 reads \(images, 16\)"):
        run(pipe, ip_adapter_image_embeds=[torch.zeros(1, 7)])
    assert run(pipe, ip_adapter_image_embeds=[torch.randn(1, 16)]).shape == (1, SIZE, SIZE, 3)


def test_bad_input_is_refused(sd15: tuple[Path, Path]) -> None:
    repo, ip = sd15
    pipe = loaded(repo, ip)
    with pytest.raises(InputError, match="give ip_adapter_image or ip_adapter_image_embeds, not both"):
        run(pipe, ip_adapter_image=picture(), ip_adapter_image_embeds=[torch.zeros(1, 16)])
    with pytest.raises(InputError, match="ip_adapter_image is a float array with values in"):
        run(pipe, ip_adapter_image=np.full((SIZE, SIZE, 3), 3.0, dtype=np.float32))
    two = loaded(repo, ip, ["plain.safetensors", "plus.safetensors"])  # type: ignore[arg-type]  # a list: two adapters
    with pytest.raises(InputError, match="ip_adapter_image must be a list of 2 entries, one per IP-Adapter"):
        run(two, ip_adapter_image=picture())


def test_scale_naming_a_missing_block_is_refused(sd15: tuple[Path, Path]) -> None:
    repo, ip = sd15
    pipe = loaded(repo, ip)
    adapter = pipe.components["ip_adapter"]
    with pytest.raises(ValueError, match=r"names down.block_0 but this UNet's down blocks with attention are \['block_1'\]"):
        pipe.set_ip_adapter_scale({"down": {"block_0": 1.0}})
    with pytest.raises(ValueError, match="IP-Adapter scale names 'middle'"):
        pipe.set_ip_adapter_scale({"middle": 1.0})
    with pytest.raises(ValueError, match="up.block_0 has 3 values but that block has 2 attention layers"):
        pipe.set_ip_adapter_scale({"up": {"block_0": [0.0, 1.0, 0.0]}})
    assert adapter.scales == (1.0,) * 4  # nothing changed
    pipe.set_ip_adapter_scale(0.0)
    pipe.unload_ip_adapter()
    with pytest.raises(ValueError, match="no IP-Adapter is loaded"):
        pipe.set_ip_adapter_scale(1.0)


def test_scale_zero_is_the_plain_unet(sd15: tuple[Path, Path]) -> None:
    repo, ip = sd15
    pipe = loaded(repo, ip)
    plain = run(pipe)
    pipe.set_ip_adapter_scale(0.0)
    assert np.array_equal(run(pipe, ip_adapter_image=picture()), plain)


def test_an_adapter_for_another_model_is_refused(sd15: tuple[Path, Path], sdxl: tuple[Path, Path], tmp_path: Path) -> None:
    repo, _ = sd15
    _, xl_ip = sdxl
    pipe = Pipeline.from_pretrained(str(repo))
    with pytest.raises(ValueError, match=r"the IP-Adapter \(8 cross-attention layers, cross_attention_dim 64\) does not fit "
                                         r"the UNet \(4 cross-attention layers, cross_attention_dim 32\)"):  # fmt: skip
        pipe.load_ip_adapter(str(xl_ip), subfolder="sdxl_models", weight_name="plain.safetensors")
    assert "ip_adapter" not in pipe.components
    other = image_encoder(tmp_path / "wide", projection_dim=24)
    _, ip = sd15
    with pytest.raises(ValueError, match="the image encoder .*projection_dim 24.* does not fit IP-Adapter 0, which reads the projected image embedding of width 16"):
        pipe.load_ip_adapter(str(ip), subfolder="models", weight_name="plain.safetensors", image_encoder=str(other))


def test_files_of_other_layouts_are_refused(tmp_path: Path) -> None:
    save_file({"lora.down.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match="is not an IP-Adapter file"):
        load_ip_adapter_file(tmp_path / "lora.safetensors")
    save_file({"image_proj.norm.weight": torch.ones(4), "image_proj.proj.0.weight": torch.zeros(8, 4),
               "ip_adapter.1.to_k_ip.weight": torch.zeros(8, 4)}, tmp_path / "faceid.safetensors")  # fmt: skip
    with pytest.raises(ValueError, match="IP-Adapter FaceID file"):
        load_ip_adapter_file(tmp_path / "faceid.safetensors")


def test_negatives_of_precomputed_hidden_states(sd15: tuple[Path, Path]) -> None:
    repo, ip = sd15
    pipe = loaded(repo, ip, "plus.safetensors")
    hidden = torch.randn(2, 17, 32)  # two images: 16 patches and the class token, 32 wide
    assert run(pipe, ip_adapter_image_embeds=[hidden]).shape == (1, SIZE, SIZE, 3)  # negatives: the encoder's, two
    with pytest.raises(InputError, match=r"negative_ip_adapter_image_embeds\[0\] has shape \(1, 17, 32\) but the image prompt's features have \(2, 17, 32\)"):
        run(pipe, ip_adapter_image_embeds=[hidden], negative_ip_adapter_image_embeds=[torch.zeros(1, 17, 32)])
    bare = Pipeline.from_pretrained(str(repo))
    bare.load_ip_adapter(load_ip_adapter_file(ip / "models" / "plus.safetensors"))
    with pytest.raises(InputError, match="negative_ip_adapter_image_embeds is needed for IP-Adapter 0"):
        run(bare, ip_adapter_image_embeds=[hidden])
    assert run(bare, ip_adapter_image_embeds=[hidden], negative_ip_adapter_image_embeds=[torch.zeros_like(hidden)]).shape == (1, SIZE, SIZE, 3)
