"""Flux IP-Adapter in a pipeline: loading, unloading, scales, saving with the preset, and bad input, each refused with both named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffblocks.blocks import InputError, Pipeline
from diffblocks.components.denoisers import Conditioning, FluxDenoiser
from diffblocks.components.models.flux import prepare_image_ids, prepare_text_ids
from diffblocks.components.models.ip_adapter import (
    FluxIPAdapterModel,
    ImageProjection,
    IPAdapterModel,
    flux_ip_adapter_from_state_dict,
    load_any_ip_adapter_file,
)
from tests.ip_adapter.ip_files import SIZE, image_encoder, picture, xlabs_tensors

KWARGS: dict[str, Any] = dict(prompt="a red circle", height=SIZE, width=SIZE, num_inference_steps=2, max_sequence_length=16,
                              output_type="np", progress=False)  # fmt: skip
TRUE_CFG: dict[str, Any] = dict(negative_prompt="blurry", true_cfg_scale=3.0)


def run(pipe: Pipeline, **kwargs: Any) -> np.ndarray:
    return pipe(**{**KWARGS, **kwargs}, generator=torch.Generator().manual_seed(5)).images


def loaded(flux: tuple[Path, Path], weight_name: str | list[str] = "ip_adapter.safetensors") -> Pipeline:
    repo, ip = flux
    pipe = Pipeline.from_pretrained(str(repo))
    pipe.load_ip_adapter(str(ip), weight_name=weight_name, image_encoder=str(ip / "image_encoder"))
    return pipe


def test_load_and_unload_give_the_pipeline_back_exactly(flux: tuple[Path, Path]) -> None:
    repo, ip = flux
    pipe = Pipeline.from_pretrained(str(repo))
    transformer = pipe.components["transformer"]
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    tree, plain = repr(pipe.blocks), run(pipe, **TRUE_CFG)
    pipe.load_ip_adapter(str(ip), weight_name="ip_adapter.safetensors", image_encoder=str(ip / "image_encoder"))
    assert isinstance(pipe.components["ip_adapter"], FluxIPAdapterModel)
    assert {"ip_adapter_image", "negative_ip_adapter_image", "ip_adapter_image_embeds"} <= set(pipe.input_names)
    for workflow in pipe.workflows:  # each workflow encodes the image prompt just before it prepares the conditions
        names = pipe.blocks.get(f"start.{workflow}").names
        assert names[names.index("prepare_flux_conditions") - 1] == "encode_image_prompt"
    assert np.abs(run(pipe, **TRUE_CFG, ip_adapter_image=picture()) - plain).max() > 1e-3
    assert np.array_equal(run(pipe, **TRUE_CFG), plain)  # no image prompt: the plain transformer
    pipe.set_ip_adapter_scale(0.0)  # every double block at 0: the plain transformer
    assert np.array_equal(run(pipe, **TRUE_CFG, ip_adapter_image=picture()), plain)
    pipe.unload_ip_adapter()
    assert repr(pipe.blocks) == tree and not {"ip_adapter", "image_encoder"} & set(pipe.components)
    assert pipe.components["transformer"] is transformer
    assert all(torch.equal(before[k], v) for k, v in transformer.state_dict().items())
    assert np.array_equal(run(pipe, **TRUE_CFG), plain)


def test_saved_with_the_preset_in_xlabs_layout_and_loaded_to_the_same_image(flux: tuple[Path, Path], tmp_path: Path) -> None:
    import diffusers

    repo, ip = flux
    pipe = loaded(flux, ["ip_adapter.safetensors", "ip_adapter_4.safetensors"])
    pipe.set_ip_adapter_scale([0.6, [1.0, 0.0]])
    images = dict(ip_adapter_image=[picture(1), [picture(2), picture(3)]], **TRUE_CFG)
    expected = run(pipe, **images)
    saved = pipe.save_pretrained(tmp_path / "saved")

    record = json.loads((saved / "modular_model_index.json").read_text())["_diffblocks_ip_adapter"]
    assert record["files"] == ["ip_adapter/ip_adapter_0.safetensors", "ip_adapter/ip_adapter_1.safetensors"]
    assert record["scales"] == [[0.6, 0.6], [1.0, 0.0]] and record["image_encoder"] == "image_encoder"
    written, original = load_file(saved / record["files"][0]), load_file(ip / "ip_adapter.safetensors")
    assert written.keys() == original.keys() and all(torch.equal(written[k], v) for k, v in original.items())  # XLabs' file
    assert np.array_equal(run(pipe, **images), expected)  # the pipeline saved keeps its adapters

    back = Pipeline.from_pretrained(str(saved))
    assert repr(back.blocks) == repr(pipe.blocks)
    assert [a.scales for a in back.components["ip_adapter"]] == [(0.6, 0.6), (1.0, 0.0)]
    assert np.array_equal(run(back, **images), expected)
    # diffusers reads the folder as the pipeline without it, and the saved file as XLabs'
    ref = diffusers.FluxPipeline.from_pretrained(saved)
    ref.load_ip_adapter(str(saved / "ip_adapter"), weight_name="ip_adapter_0.safetensors",
                        image_encoder_pretrained_model_name_or_path=str(saved / "image_encoder"), image_encoder_dtype=torch.float32)  # fmt: skip

    (saved / record["files"][1]).write_bytes((ip / "ip_adapter.safetensors").read_bytes())
    with pytest.raises(ValueError, match="sha256"):
        Pipeline.from_pretrained(str(saved))


def test_by_value_and_diffusers_naming(flux: tuple[Path, Path], tmp_path: Path) -> None:
    repo, ip = flux
    adapter = load_any_ip_adapter_file(ip / "ip_adapter.safetensors")
    assert isinstance(adapter, FluxIPAdapterModel) and adapter.scales == (1.0, 1.0)
    assert torch.equal(adapter.xlabs_state_dict()["double_blocks.1.processor.ip_adapter_double_stream_v_proj.bias"],
                       load_file(ip / "ip_adapter.safetensors")["double_blocks.1.processor.ip_adapter_double_stream_v_proj.bias"])  # fmt: skip
    # diffusers' renaming of the file (image_proj.*, ip_adapter.N.to_k_ip.*) reads the same
    renamed = flux_ip_adapter_from_state_dict(adapter.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(renamed.state_dict().values(), adapter.state_dict().values(), strict=True))

    pipe = Pipeline.from_pretrained(str(repo))
    pipe.load_ip_adapter(adapter)  # by value, no image encoder: embeddings only
    embeds = [torch.randn(1, 16, generator=torch.Generator().manual_seed(0))]
    out = run(pipe, ip_adapter_image_embeds=embeds)
    pipe.load_ip_adapter(adapter, image_encoder=str(ip / "image_encoder"))
    assert np.array_equal(run(pipe, ip_adapter_image_embeds=embeds), out)


def test_image_without_an_encoder_and_bad_input_are_refused_before_any_block_runs(flux: tuple[Path, Path]) -> None:
    repo, ip = flux
    pipe = Pipeline.from_pretrained(str(repo))
    pipe.load_ip_adapter(load_any_ip_adapter_file(ip / "ip_adapter.safetensors"))
    with pytest.raises(InputError, match="ip_adapter_image is given but no image encoder is loaded"):
        run(pipe, ip_adapter_image=picture())
    with pytest.raises(InputError, match="negative_ip_adapter_image is given but no image encoder is loaded"):
        run(pipe, ip_adapter_image_embeds=[torch.zeros(1, 16)], negative_ip_adapter_image=picture())
    with pytest.raises(InputError, match=r"ip_adapter_image_embeds\[0\] has shape \(1, 7\), but IP-Adapter 0 reads \(images, 16\)"):
        run(pipe, ip_adapter_image_embeds=[torch.zeros(1, 7)])
    with pytest.raises(InputError, match=r"negative_ip_adapter_image is not given \(for IP-Adapter 0\), and its default.* needs an image encoder"):
        run(pipe, ip_adapter_image_embeds=[torch.zeros(1, 16)], **TRUE_CFG)  # the negative pass's default is a black picture's

    pipe = loaded(flux, ["ip_adapter.safetensors", "ip_adapter_4.safetensors"])
    with pytest.raises(InputError, match="give ip_adapter_image or ip_adapter_image_embeds, not both"):
        run(pipe, ip_adapter_image=[picture(), picture()], ip_adapter_image_embeds=[torch.zeros(1, 16)] * 2)
    with pytest.raises(InputError, match="ip_adapter_image must be a list of 2 entries, one per IP-Adapter"):
        run(pipe, ip_adapter_image=picture())
    with pytest.raises(InputError, match="IP-Adapter 1 has 2 images in ip_adapter_image but 3 in negative_ip_adapter_image"):
        run(pipe, ip_adapter_image=[picture(), [picture(), picture()]], negative_ip_adapter_image=[picture(), [picture()] * 3], **TRUE_CFG)
    with pytest.raises(ValueError, match="set_ip_adapter_scale got 3 scales for 2 IP-Adapters"):
        pipe.set_ip_adapter_scale([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="the scale of IP-Adapter 1 has 3 values but the Flux transformer has 2 double blocks"):
        pipe.set_ip_adapter_scale([1.0, [1.0, 0.5, 0.0]])


def test_an_adapter_for_another_family_or_width_is_refused_naming_both(flux: tuple[Path, Path], sd15: tuple[Path, Path], tmp_path: Path) -> None:
    repo, ip = flux
    pipe = Pipeline.from_pretrained(str(repo))
    tree = repr(pipe.blocks)
    with pytest.raises(ValueError, match=r"the IP-Adapter \(a UNet's: 4 cross-attention layers, cross_attention_dim 32\) does not fit the "
                                         r"Flux transformer \(2 double blocks, joint_attention_dim 32, width 32\): it is made for SD 1.x/2.x or SDXL"):  # fmt: skip
        pipe.load_ip_adapter(str(sd15[1]), subfolder="models", weight_name="plain.safetensors")
    wide = tmp_path / "wide.safetensors"
    save_file(xlabs_tensors(2, 32, 64), wide)
    with pytest.raises(ValueError, match=r"the IP-Adapter \(Flux, 2 double blocks, joint_attention_dim 32, width 64\) does not fit the Flux "
                                         r"transformer \(2 double blocks, joint_attention_dim 32, width 32\): width 64 vs 32"):  # fmt: skip
        pipe.load_ip_adapter(str(wide))
    with pytest.raises(ValueError, match="the image encoder .*projection_dim 24.* does not fit IP-Adapter 0"):
        pipe.load_ip_adapter(str(ip / "ip_adapter.safetensors"), image_encoder=str(image_encoder(tmp_path / "enc", projection_dim=24)))
    assert repr(pipe.blocks) == tree and "ip_adapter" not in pipe.components  # nothing changed

    sd = Pipeline.from_pretrained(str(sd15[0]))
    with pytest.raises(ValueError, match=r"the IP-Adapter \(Flux, 2 double blocks, joint_attention_dim 32, width 32\) does not fit the UNet "
                                         r"\(4 cross-attention layers, cross_attention_dim 32\): it is made for Flux"):  # fmt: skip
        sd.load_ip_adapter(str(ip / "ip_adapter.safetensors"))


def test_files_of_other_layouts_and_a_denoiser_without_the_adapter_are_refused(tmp_path: Path) -> None:
    tensors = xlabs_tensors(2, 32, 32)
    gap = {k.replace("double_blocks.1.", "double_blocks.2."): v for k, v in tensors.items()}
    with pytest.raises(ValueError, match=r"double blocks are numbered \[0, 2\], not 0, 1, 2"):
        flux_ip_adapter_from_state_dict(gap)
    with pytest.raises(ValueError, match=r"not a Flux IP-Adapter file.*found other keys: \['lora.weight'\]"):
        flux_ip_adapter_from_state_dict({**tensors, "lora.weight": torch.zeros(1)})
    assert isinstance(load_any_ip_adapter_file(_saved(tmp_path, tensors)), FluxIPAdapterModel)

    adapter = FluxIPAdapterModel(ImageProjection(16, 32), 2, inner_dim=32)
    assert not isinstance(adapter, IPAdapterModel) and adapter.describe().startswith("Flux, 2 double blocks")
    pipe_free = Conditioning(torch.randn(1, 5, 32), pooled_embeds=torch.randn(1, 32), text_ids=prepare_text_ids(5),
                             image_ids=prepare_image_ids(2, 2), image_embeds=(torch.randn(1, 4, 32),))  # fmt: skip
    from diffblocks.components.models.flux import FluxParams, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(FluxParams(in_channels=8, num_layers=2, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))).eval()  # fmt: skip
    x, t = torch.randn(1, 4, 8), torch.tensor(500.0)
    with pytest.raises(ValueError, match="no IP-Adapter is attached to the Flux denoiser"):
        FluxDenoiser(transformer)(x, t, pipe_free)
    with torch.no_grad():
        prompted = FluxDenoiser(transformer, ip_adapter=adapter)(x, t, pipe_free)
        adapter.set_scales(0.0)
        unprompted = FluxDenoiser(transformer, ip_adapter=adapter)(x, t, pipe_free)
        plain = FluxDenoiser(transformer)(x, t, Conditioning(pipe_free.prompt_embeds, pooled_embeds=pipe_free.pooled_embeds,
                                                             text_ids=pipe_free.text_ids, image_ids=pipe_free.image_ids))  # fmt: skip
    assert torch.equal(unprompted, plain) and not torch.allclose(prompted, plain)
    with pytest.raises(ValueError, match=r"image_prompt has 1 entries, but the transformer takes one per double block \(2\)"):
        transformer(x, encoder_hidden_states=pipe_free.prompt_embeds, pooled_projections=pipe_free.pooled_embeds,
                    timestep=torch.tensor([0.5]), img_ids=prepare_image_ids(2, 2), txt_ids=prepare_text_ids(5), image_prompt=[[]])  # fmt: skip


def _saved(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, folder / "ip_adapter.safetensors")
    return folder / "ip_adapter.safetensors"


def test_with_a_flux_controlnet_both_act(flux: tuple[Path, Path]) -> None:
    from diffblocks.components.models.controlnet import FluxControlNetModel, FluxControlNetParams
    from diffblocks.presets.controlnet import with_controlnet

    torch.manual_seed(0)
    net = FluxControlNetModel(FluxControlNetParams(in_channels=64, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6), num_layers=1, num_single_layers=0)).eval()  # fmt: skip
    with torch.no_grad():  # a ControlNet starts at zero: give it weights to see an effect
        for layer in [*net.controlnet_blocks, net.controlnet_x_embedder]:
            layer.weight.normal_(std=0.3)
    repo, ip = flux
    pipe = with_controlnet(Pipeline.from_pretrained(str(repo)), net)
    pipe.load_ip_adapter(str(ip), weight_name="ip_adapter.safetensors", image_encoder=str(ip / "image_encoder"))
    controlled = run(pipe, control_image=picture(7), **TRUE_CFG)
    both = run(pipe, control_image=picture(7), ip_adapter_image=picture(), **TRUE_CFG)
    assert np.abs(both - controlled).max() > 1e-3
