"""Models from single-file checkpoints: the layout tables against diffusers' converter, and bad files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffblocks.components.models import CheckpointError
from diffblocks.components.models.autoencoder_kl import AutoencoderKL
from diffblocks.components.models.flux import FluxTransformer2DModel
from diffblocks.components.models.single_file import BFL, LDM, Layout, Rows, Swapped, Take, to_original
from diffblocks.components.models.single_file.loading import rules_for
from diffblocks.components.models.unet import UNet2DConditionModel
from tests.models.single_file_fixtures import FLUX_TRANSFORMER, LDM_EXTRAS, SD1, original_state, write_single_file
from tests.presets.flux_fixtures import tiny_flux
from tests.presets.sd_fixtures import tiny_sd15


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sd1")
    repo = tiny_sd15(root / "repo")
    return repo, write_single_file(repo, root / "sd1.safetensors", SD1, extras=LDM_EXTRAS)


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("flux")
    repo = tiny_flux(root / "repo")
    return repo, write_single_file(repo, root / "flux1-dev.safetensors", FLUX_TRANSFORMER)


def assert_same(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert set(mine) == set(reference)
    assert all(torch.equal(mine[key], reference[key]) for key in reference)


@pytest.mark.parametrize("cls", [UNet2DConditionModel, AutoencoderKL])
def test_ldm_models_match_diffusers_single_file(sd1: tuple[Path, Path], cls: type) -> None:
    import diffusers

    repo, file = sd1
    subfolder = "unet" if cls is UNet2DConditionModel else "vae"
    theirs = getattr(diffusers, cls.__name__).from_single_file(str(file), config=str(repo), subfolder=subfolder)
    assert_same(cls.from_single_file(file, config=repo), theirs)
    inferred = cls.from_single_file(file)  # the config from the file's shapes
    assert_same(inferred, theirs)
    given = {k: v for k, v in dict(theirs.config).items() if not k.startswith("_")}
    differ = {k for k, v in inferred.to_config().items() if k in given and given[k] != (list(v) if isinstance(v, tuple) else v)}
    assert differ <= {"sample_size"}  # the image size is not in the weights


def test_flux_transformer_from_bfl_keys(flux: tuple[Path, Path]) -> None:
    import diffusers
    from safetensors import safe_open

    repo, file = flux
    with safe_open(str(file), framework="pt") as f:
        keys = set(f.keys())
    # BFL's names, written out by hand: the table is checked against them, not against itself
    block = {"img_mod.lin", "txt_mod.lin", "img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2"}
    expected = {f"double_blocks.0.{layer}.{p}" for layer in block for p in ("weight", "bias")}
    expected |= {f"double_blocks.0.{s}_attn.norm.{n}_norm.scale" for s in ("img", "txt") for n in ("query", "key")}
    expected |= {f"single_blocks.0.{layer}.{p}" for layer in ("linear1", "linear2", "modulation.lin") for p in ("weight", "bias")}
    expected |= {f"single_blocks.0.norm.{n}_norm.scale" for n in ("query", "key")}
    embedders = ("time_in", "vector_in", "guidance_in")
    expected |= {f"{e}.{layer}.{p}" for e in embedders for layer in ("in_layer", "out_layer") for p in ("weight", "bias")}
    expected |= {f"{layer}.{p}" for layer in ("img_in", "txt_in", "final_layer.linear", "final_layer.adaLN_modulation.1") for p in ("weight", "bias")}
    assert keys == expected
    theirs = diffusers.FluxTransformer2DModel.from_pretrained(repo, subfolder="transformer")
    assert_same(FluxTransformer2DModel.from_single_file(file, config=repo), theirs)
    with pytest.raises(ValueError, match="16-channel heads.*pass config="):
        FluxTransformer2DModel.from_single_file(file)  # Flux.1's RoPE axes are for 128-channel heads only


def test_rules_fuse_and_swap_as_bfl_stores_them() -> None:
    config = {"num_attention_heads": 2, "attention_head_dim": 16}  # 32 channels, an MLP of 128
    keys = ["single_transformer_blocks.0.proj_mlp.weight", "norm_out.linear.weight", "x_embedder.bias"]
    rules = rules_for(BFL.part("transformer"), keys, config)
    assert rules == {
        "single_transformer_blocks.0.proj_mlp.weight": Rows("single_blocks.0.linear1.weight", 96, 224),
        "norm_out.linear.weight": Swapped("final_layer.adaLN_modulation.1.weight"),
        "x_embedder.bias": Take("img_in.bias"),
    }
    scale_shift = torch.arange(4.0)  # diffusers reads scale first, BFL stores shift first
    original = to_original({"norm_out.linear.weight": scale_shift}, {"norm_out.linear.weight": rules["norm_out.linear.weight"]})
    assert original["final_layer.adaLN_modulation.1.weight"].tolist() == [2.0, 3.0, 0.0, 1.0]


def test_unknown_layout_names_the_closest_and_what_is_missing(sd1: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(sd1[1]), framework="pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("model.diffusion_model.middle_block")}
    save_file(kept, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"closest is the LDM .* unet .* lacks model\.diffusion_model\.middle_block\.0\.in_layers\.0\.weight"):
        UNet2DConditionModel.from_single_file(tmp_path / "partial.safetensors")
    save_file({"lora_unet_down.alpha": torch.ones(1)}, str(tmp_path / "lora.safetensors"))
    from diffblocks.blocks import Pipeline

    with pytest.raises(ValueError, match=r"fit no known layout for a pipeline.*closest is"):
        Pipeline.from_single_file(tmp_path / "lora.safetensors")


def test_config_of_another_model_lists_the_missing_tensors(sd1: tuple[Path, Path], flux: tuple[Path, Path]) -> None:
    # the VAE of the SD file read with the Flux repository's VAE config (four levels, not two)
    with pytest.raises(CheckpointError, match=r"the vae under 'first_stage_model\.' lacks .* tensors .* another model"):
        AutoencoderKL.from_single_file(sd1[1], config=flux[0])


def test_truncated_file_is_reported(sd1: tuple[Path, Path], tmp_path: Path) -> None:
    data = sd1[1].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        UNet2DConditionModel.from_single_file(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        UNet2DConditionModel.from_single_file(tmp_path / "junk.safetensors")


def test_pickle_checkpoints_need_the_opt_in(sd1: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    repo, file = sd1
    ckpt = tmp_path / "sd1.ckpt"
    torch.save({"state_dict": load_file(str(file)), "global_step": 470000}, ckpt)  # as LDM's training saved them
    with pytest.raises(CheckpointError, match="pickle checkpoint.*allow_pickle=True"):
        UNet2DConditionModel.from_single_file(ckpt)
    assert_same(UNet2DConditionModel.from_single_file(ckpt, allow_pickle=True), UNet2DConditionModel.from_single_file(file))
    hostile = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {}, "callback": Path("/")}, hostile)  # not only tensors: weights_only refuses to build it
    with pytest.raises(CheckpointError, match=r"weights_only=True\) refused it.*pathlib"):
        UNet2DConditionModel.from_single_file(hostile, allow_pickle=True)


def test_ldm_vae_attention_is_stored_as_convolutions(sd1: tuple[Path, Path]) -> None:
    from safetensors import safe_open

    with safe_open(str(sd1[1]), framework="pt") as f:
        assert f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()[2:] == [1, 1]
    assert LDM.parts[1].table("encoder.mid_block.attentions.0.to_q.weight", {}) is not None


@pytest.mark.skipif(not os.environ.get("DIFFBLOCKS_FULL_WIDTH"), reason="set DIFFBLOCKS_FULL_WIDTH=1 (about 2 GB, a minute)")
def test_flux_at_full_width_matches_diffusers_converter(tmp_path: Path) -> None:
    # diffusers' BFL converter is written for Flux.1's 3072 channels: one block of each kind at that width
    import diffusers

    torch.manual_seed(0)
    reference = diffusers.FluxTransformer2DModel(
        num_layers=1, num_single_layers=1, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True
    )
    reference.save_pretrained(tmp_path / "repo" / "transformer")
    file = write_single_file(tmp_path / "repo", tmp_path / "flux1-dev.safetensors", {"transformer": FLUX_TRANSFORMER["transformer"]})
    del reference
    theirs = diffusers.FluxTransformer2DModel.from_single_file(str(file), config=str(tmp_path / "repo"), subfolder="transformer")
    ours = FluxTransformer2DModel.from_single_file(file)  # config inferred: 128-channel heads, Flux.1's RoPE axes
    assert_same(ours, theirs)
    tokens, text = torch.randn(1, 16, 64), torch.randn(1, 8, 64)
    kwargs = dict(
        hidden_states=tokens, encoder_hidden_states=text, pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]),
    )
    with torch.no_grad():
        assert (ours(**kwargs) - theirs(**kwargs, return_dict=False)[0]).abs().max() < 1e-4


def test_flux_vae_alone_as_bfl_releases_it(flux: tuple[Path, Path], tmp_path: Path) -> None:
    # BFL's ae.safetensors: the VAE alone, in LDM's names, without a prefix
    import diffusers

    repo, _ = flux
    file = write_single_file(repo, tmp_path / "ae.safetensors", {"vae": (BFL, 1, "")})
    theirs = diffusers.AutoencoderKL.from_pretrained(repo, subfolder="vae")
    assert_same(AutoencoderKL.from_single_file(file, config=repo), theirs)


def _written(model: torch.nn.Module, part_index: int, layout: Layout, prefix: str, config: dict[str, object], path: Path) -> Path:
    """``model`` saved at ``path`` in ``layout``, as the layout's part ``part_index`` under ``prefix``."""
    state = original_state(layout.parts[part_index], prefix, model.state_dict(), config)
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(path))
    return path


def test_sdxl_unet_config_inferred(tmp_path: Path) -> None:
    # shaped by SDXL's conventions: heads of 64 channels, time ids embedded with 256 channels, deeper lower levels
    from diffblocks.components.models.single_file import SGM

    config: dict[str, object] = {
        "block_out_channels": (64, 128),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2),
        "attention_head_dim": (1, 2),
        "use_linear_projection": True,
        "cross_attention_dim": 80,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 6 * 256 + 48,
    }
    unet = UNet2DConditionModel.from_config(config)
    file = _written(unet, 0, SGM, "model.diffusion_model.", config, tmp_path / "sdxl.safetensors")
    inferred = UNet2DConditionModel.from_single_file(file)
    assert inferred.params == unet.params
    assert_same(inferred, unet)


def test_flux_config_inferred_for_128_channel_heads(tmp_path: Path) -> None:
    config: dict[str, object] = {
        "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 128, "num_attention_heads": 1,
        "joint_attention_dim": 32, "pooled_projection_dim": 16, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56),
    }
    model = FluxTransformer2DModel.from_config(config)
    file = _written(model, 0, BFL, "model.diffusion_model.", config, tmp_path / "flux1-schnell.safetensors")
    inferred = FluxTransformer2DModel.from_single_file(file)
    assert inferred.params == model.params
    assert_same(inferred, model)


def test_config_from_a_hub_id(sd1: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.hubcache import add_cached_repo, use_hub_cache

    repo, file = sd1
    add_cached_repo(use_hub_cache(monkeypatch, tmp_path / "hub"), "org/sd1-tiny", repo)
    assert_same(AutoencoderKL.from_single_file(file, config="org/sd1-tiny"), AutoencoderKL.from_pretrained(repo, subfolder="vae"))


def test_subfolder_may_not_leave_the_config_folder(sd1: tuple[Path, Path]) -> None:
    from diffblocks.components.containment import RepositoryPathError

    with pytest.raises(RepositoryPathError):
        AutoencoderKL.from_single_file(sd1[1], config=sd1[0], subfolder="../..")
