"""IP-Adapter FaceID, FaceID-Plus and PlusV2 against diffusers' ``load_ip_adapter`` with precomputed face embeddings.

The files are random tensors in the released files' key layout (``image_proj.*``, and for every
attention layer N the LoRA ``ip_adapter.N.to_{q,k,v,out}_lora.{down,up}.weight``); diffusers loads
them with PEFT, we through our LoRA adapters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffblocks.blocks import InputError, Pipeline
from diffblocks.components.lora import adapter_names
from diffblocks.components.models.ip_adapter import (
    FaceIDPlusProjection,
    FaceIDProjection,
    IPAdapterModel,
    attention_dims,
    attention_layers,
    ip_adapter_from_state_dict,
    load_ip_adapter_file,
)
from tests.ip_adapter.faceid_files import ID_DIM, attention_widths, face_embeds, faceid_tensors, save_bin
from tests.ip_adapter.ip_files import SIZE, image_encoder, picture
from tests.presets.sd_fixtures import tiny_sd15, tiny_sdxl

KWARGS: dict[str, Any] = dict(prompt="a face", height=SIZE, width=SIZE, num_inference_steps=3)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("faceid_sd15")
    base = tiny_sd15(root / "sd15")
    models = root / "ip" / "models"
    models.mkdir(parents=True)
    widths = attention_widths(base / "unet")
    save_file(faceid_tensors(widths, "faceid"), models / "faceid.safetensors")
    save_bin(faceid_tensors(widths, "faceid"), models / "faceid.bin")
    save_file(faceid_tensors(widths, "faceid_plus", seed=8), models / "plus.safetensors")
    image_encoder(models / "image_encoder")
    return base, root / "ip"


def reference(repo: Path, ip: Path, weight_name: str, *, sdxl: bool = False, **load: Any) -> Any:
    import diffusers

    cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
    ref = cls.from_pretrained(repo, **({"add_watermarker": False} if sdxl else {"safety_checker": None}))
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(ip), subfolder="sdxl_models" if sdxl else "models", weight_name=weight_name, **load)
    return ref


def diffusers_embeds(ids: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """diffusers' form: ``(batch, images, 1, 512)``, zeros then the faces under guidance (its FaceID docs' recipe)."""
    faces = ids[None, :, None, :]
    return torch.cat([torch.zeros_like(faces), faces]) if guidance_scale > 1 else faces


def run(pipe: Pipeline, **kwargs: Any) -> np.ndarray:
    return pipe(**KWARGS, **kwargs, generator=torch.Generator().manual_seed(5), output_type="np", progress=False).images


@pytest.mark.parametrize(
    ("weight_name", "guidance_scale"), [("faceid.safetensors", 6.0), ("faceid.safetensors", 1.0), ("faceid.bin", 6.0)], ids=["cfg", "no-cfg", "bin"]
)
def test_faceid_matches_diffusers(sd15: tuple[Path, Path], weight_name: str, guidance_scale: float) -> None:
    repo, ip = sd15
    ids = face_embeds(1)
    ref = reference(repo, ip, weight_name, image_encoder_folder=None)
    expected = ref(**KWARGS, guidance_scale=guidance_scale, ip_adapter_image_embeds=[diffusers_embeds(ids, guidance_scale)],
                   generator=torch.Generator().manual_seed(5), output_type="np").images  # fmt: skip
    ours = Pipeline.from_pretrained(str(repo))
    plain = run(ours, guidance_scale=guidance_scale)
    ours.load_ip_adapter(str(ip), subfolder="models", weight_name=weight_name, allow_pickle=weight_name.endswith(".bin"))
    assert adapter_names(ours.components["unet"]) == ["faceid_0"] and "image_encoder" not in ours.components
    images = run(ours, guidance_scale=guidance_scale, ip_adapter_image_embeds=[ids])
    assert np.abs(images - expected).max() < 1e-5
    assert np.abs(images - plain).max() > 1e-3
    ours.set_adapters("faceid_0", 0.0)  # the LoRA takes part: without it, another image
    assert np.abs(run(ours, guidance_scale=guidance_scale, ip_adapter_image_embeds=[ids]) - images).max() > 1e-3


@pytest.mark.parametrize("shortcut", [None, 0.8], ids=["plus", "plus-v2"])
def test_faceid_plus_matches_diffusers(sd15: tuple[Path, Path], shortcut: float | None) -> None:
    repo, ip = sd15
    ids = face_embeds(1, seed=1)
    ref = reference(repo, ip, "plus.safetensors")
    # diffusers reads the face crop's CLIP hidden states from an attribute of the projection, negatives first
    clip = ref.prepare_ip_adapter_image_embeds([picture(3)], None, torch.device("cpu"), 1, True)[0]
    projection = ref.unet.encoder_hid_proj.image_projection_layers[0]
    projection.clip_embeds, projection.shortcut = clip, shortcut is not None
    projection.shortcut_scale = 1.0 if shortcut is None else shortcut
    expected = ref(**KWARGS, guidance_scale=6.0, ip_adapter_image_embeds=[diffusers_embeds(ids, 6.0)],
                   generator=torch.Generator().manual_seed(5), output_type="np").images  # fmt: skip
    ours = Pipeline.from_pretrained(str(repo))
    ours.load_ip_adapter(str(ip), subfolder="models", weight_name="plus.safetensors")
    assert isinstance(ours.components["ip_adapter"].image_proj, FaceIDPlusProjection)
    # the negative CLIP hidden states default to the encoder's of all-zero pixels, as diffusers makes them
    images = run(ours, guidance_scale=6.0, ip_adapter_image_embeds=[ids], ip_adapter_clip_embeds=[clip[1]], ip_adapter_shortcut_scale=shortcut)
    assert np.abs(images - expected).max() < 1e-5


def test_sdxl_faceid_matches_diffusers(tmp_path: Path) -> None:
    repo = tiny_sdxl(tmp_path / "sdxl")
    models = tmp_path / "ip" / "sdxl_models"
    models.mkdir(parents=True)
    save_file(faceid_tensors(attention_widths(repo / "unet"), "faceid"), models / "faceid.safetensors")
    ids = face_embeds(2, seed=4)  # two faces of one person: their tokens joined
    ref = reference(repo, tmp_path / "ip", "faceid.safetensors", sdxl=True, image_encoder_folder=None)
    expected = ref(**KWARGS, guidance_scale=5.0, ip_adapter_image_embeds=[diffusers_embeds(ids, 5.0)],
                   generator=torch.Generator().manual_seed(5), output_type="np").images  # fmt: skip
    ours = Pipeline.from_pretrained(str(repo))
    ours.load_ip_adapter(str(tmp_path / "ip"), subfolder="sdxl_models", weight_name="faceid.safetensors")
    assert np.abs(run(ours, guidance_scale=5.0, ip_adapter_image_embeds=[ids]) - expected).max() < 1e-5


def test_faceid_inputs_refused(sd15: tuple[Path, Path]) -> None:
    repo, ip = sd15
    pipe = Pipeline.from_pretrained(str(repo))
    with pytest.raises(ValueError, match="is a pickled file"):
        pipe.load_ip_adapter(str(ip), subfolder="models", weight_name="faceid.bin")
    pipe.load_ip_adapter(str(ip), subfolder="models", weight_name="faceid.safetensors")
    with pytest.raises(InputError, match=r"IP-Adapter 0 is a FaceID adapter: .*insightface.* pass them as ip_adapter_image_embeds=.*\(images, 512\)"):
        run(pipe, ip_adapter_image=picture())
    with pytest.raises(InputError, match=r"ip_adapter_image_embeds\[0\] has shape \(1, 1, 512\), but IP-Adapter 0 is a FaceID adapter and reads \(images, 512\)"):
        run(pipe, ip_adapter_image_embeds=[face_embeds(1)[None]])
    with pytest.raises(InputError, match=r"ip_adapter_shortcut_scale is given, but only FaceID-Plus IP-Adapters read"):
        run(pipe, ip_adapter_image_embeds=[face_embeds(1)], ip_adapter_shortcut_scale=1.0)
    with pytest.raises(InputError, match=r"ip_adapter_clip_embeds\[0\] is given for IP-Adapter 0, but only FaceID-Plus .*: give None for it"):
        run(pipe, ip_adapter_image_embeds=[face_embeds(1)], ip_adapter_clip_embeds=[torch.randn(1, 17, 32)])
    pipe.load_ip_adapter(str(ip), subfolder="models", weight_name="plus.safetensors")  # with the image encoder
    ids = face_embeds(2)
    with pytest.raises(InputError, match=r"ip_adapter_clip_embeds is needed for IP-Adapter 0, a FaceID-Plus adapter"):
        run(pipe, ip_adapter_image_embeds=[ids])
    with pytest.raises(InputError, match=r"ip_adapter_clip_embeds\[0\] has shape \(1, 17, 32\), but IP-Adapter 0 \(FaceID-Plus\) reads \(2, seq, 32\)"):
        run(pipe, ip_adapter_image_embeds=[ids], ip_adapter_clip_embeds=[torch.randn(1, 17, 32)])
    assert run(pipe, ip_adapter_image_embeds=[ids], ip_adapter_clip_embeds=[torch.randn(2, 17, 32)]).shape == (1, SIZE, SIZE, 3)
    bare = Pipeline.from_pretrained(str(repo))
    bare.load_ip_adapter(load_ip_adapter_file(ip / "models" / "plus.safetensors"))
    with pytest.raises(InputError, match="negative_ip_adapter_clip_embeds is needed for IP-Adapter 0"):
        run(bare, ip_adapter_image_embeds=[ids], ip_adapter_clip_embeds=[torch.randn(2, 17, 32)])


def test_faceid_lora_comes_and_goes_with_the_adapter(sd15: tuple[Path, Path]) -> None:
    repo, ip = sd15
    pipe = Pipeline.from_pretrained(str(repo))
    unet = pipe.components["unet"]
    plain = run(pipe)
    state = {key: t.clone() for key, t in unet.state_dict().items()}
    for _ in range(2):  # loading again replaces the adapter and its LoRA
        pipe.load_ip_adapter(str(ip), subfolder="models", weight_name="faceid.safetensors")
        assert adapter_names(unet) == ["faceid_0"]
    ids = face_embeds(1)
    unfused = run(pipe, ip_adapter_image_embeds=[ids])
    pipe.fuse_lora()  # FaceID's LoRA fuses like any other, and must be unfused before it can go
    assert np.abs(run(pipe, ip_adapter_image_embeds=[ids]) - unfused).max() < 1e-5
    with pytest.raises(ValueError, match=r"unfuse them \(pipe.unfuse_lora\(\)\) before unloading a FaceID IP-Adapter"):
        pipe.unload_ip_adapter()
    pipe.unfuse_lora()
    pipe.load_ip_adapter(str(ip), subfolder="models", weight_name=["faceid.safetensors", "plus.safetensors"])
    assert adapter_names(unet) == ["faceid_0", "faceid_1"]
    pipe.unload_ip_adapter()
    assert adapter_names(unet) == [] and all(torch.equal(t, state[key]) for key, t in unet.state_dict().items())
    assert np.array_equal(run(pipe), plain)
    pipe.load_lora_weights(_lora_file(ip.parent, unet), adapter_name="faceid_0")
    with pytest.raises(ValueError, match="a LoRA of that name is attached already"):
        pipe.load_ip_adapter(str(ip), subfolder="models", weight_name="faceid.safetensors")
    assert "ip_adapter" not in pipe.components and adapter_names(unet) == ["faceid_0"]


def _lora_file(folder: Path, unet: Any) -> str:
    """A user's LoRA file of one layer, in diffusers' layout."""
    path = folder / "user_lora.safetensors"
    name, attn = attention_layers(unet)[0]
    query, inner = attn.key_dims  # a self-attention layer's keys read what its queries read
    save_file({f"unet.{name}.to_q.lora_A.weight": torch.zeros(2, query), f"unet.{name}.to_q.lora_B.weight": torch.zeros(inner, 2)}, path)
    return str(path)


def test_faceid_saved_with_the_preset(sd15: tuple[Path, Path], tmp_path: Path) -> None:
    repo, ip = sd15
    pipe = Pipeline.from_pretrained(str(repo))
    pipe.load_ip_adapter(str(ip), subfolder="models", weight_name="plus.safetensors")
    pipe.set_ip_adapter_scale(0.6)
    ids, clip = face_embeds(1), torch.randn(1, 17, 32)
    inputs = dict(ip_adapter_image_embeds=[ids], ip_adapter_clip_embeds=[clip], ip_adapter_shortcut_scale=1.0)
    before = run(pipe, **inputs)
    saved = pipe.save_pretrained(tmp_path / "saved")
    assert adapter_names(pipe.components["unet"]) == ["faceid_0"]  # put back after the save
    written = load_file(saved / "ip_adapter" / "ip_adapter_0.safetensors")
    assert written.keys() == load_file(ip / "models" / "plus.safetensors").keys()  # the released layout, LoRA and all
    back = Pipeline.from_pretrained(saved)
    assert adapter_names(back.components["unet"]) == ["faceid_0"]
    assert np.array_equal(run(back, **inputs), before)


def test_faceid_adapter_by_value(sd15: tuple[Path, Path]) -> None:
    repo, ip = sd15
    tensors = load_file(ip / "models" / "faceid.safetensors")
    adapter = load_ip_adapter_file(ip / "models" / "faceid.safetensors")
    assert isinstance(adapter.image_proj, FaceIDProjection) and adapter.embed_dim == ID_DIM and adapter.reads_face_embeddings
    assert all(torch.equal(t, tensors[key]) for key, t in adapter.state_dict().items()) and adapter.state_dict().keys() == tensors.keys()
    unet = Pipeline.from_pretrained(str(repo)).components["unet"]
    assert [tuple(d) for d in attention_dims(unet)] == attention_widths(repo / "unet")
    with pytest.raises(ValueError, match=r"lora_dims has 3 attention layers but 4 cross-attention layers need 8"):
        IPAdapterModel(FaceIDProjection(ID_DIM, 32), [(32, 32)] * 4, lora_dims=attention_dims(unet)[:3])
    missing = {key: t for key, t in tensors.items() if key != "ip_adapter.4.to_v_lora.up.weight"}
    with pytest.raises(ValueError, match=r"its LoRA lacks ip_adapter.4.to_v_lora.up.weight"):
        ip_adapter_from_state_dict(missing)
