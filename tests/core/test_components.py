"""Component specs, index files as they are on the Hub, and the ComponentsManager."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffblocks.blocks import Pipeline
from diffblocks.components import ComponentSpec, ComponentsManager, read_index, write_modular_index
from diffblocks.registry import Registry
from tests.conftest import CLIP_TOKENIZER_DIR
from tests.core.test_plan import toy_blocks
from tests.core.toy import Decoder, Denoiser
from tests.hubcache import add_cached_repo, use_hub_cache

SD15_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "requires_safety_checker": True,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SDXL_MODULAR_INDEX = {
    "_blocks_class_name": "SequentialPipelineBlocks",
    "_class_name": "StableDiffusionXLModularPipeline",
    "_diffusers_version": "0.36.0",
    "force_zeros_for_empty_prompt": True,
    "scheduler": [
        "diffusers",
        "EulerDiscreteScheduler",
        {
            "pretrained_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0",
            "revision": None,
            "subfolder": "scheduler",
            "type_hint": ["diffusers", "EulerDiscreteScheduler"],
            "variant": None,
        },
    ],
    "unet": [
        "diffusers",
        "UNet2DConditionModel",
        {
            "repo": "RunDiffusion/Juggernaut-XL-v9",
            "revision": "refs/pr/6",
            "subfolder": "unet",
            "type_hint": ["diffusers", "UNet2DConditionModel"],
            "variant": "fp16",
        },
    ],
    "vae": [None, None, {"pretrained_model_name_or_path": None, "type_hint": [None, None]}],
}


def test_classic_model_index(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps(SD15_MODEL_INDEX))
    index = read_index(tmp_path)
    assert index.source == "model_index.json"
    assert index.class_name == "StableDiffusionPipeline"
    assert set(index.components) == {"feature_extractor", "scheduler", "text_encoder", "tokenizer", "unet", "vae"}
    unet = index.components["unet"]
    assert (unet.type_hint, unet.repo, unet.subfolder) == (("diffusers", "UNet2DConditionModel"), str(tmp_path), "unet")
    assert index.settings == {"requires_safety_checker": True}


def test_modular_index_is_preferred_and_keeps_loading_fields(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps(SD15_MODEL_INDEX))
    (tmp_path / "modular_model_index.json").write_text(json.dumps(SDXL_MODULAR_INDEX))
    index = read_index(tmp_path)
    assert index.source == "modular_model_index.json"
    unet = index.components["unet"]
    assert (unet.repo, unet.revision, unet.variant) == ("RunDiffusion/Juggernaut-XL-v9", "refs/pr/6", "fp16")
    assert index.components["scheduler"].repo == "stabilityai/stable-diffusion-xl-base-1.0"
    assert "vae" not in index.components
    assert index.settings == {"force_zeros_for_empty_prompt": True}


def test_modular_index_round_trip(tmp_path: Path) -> None:
    specs = {
        "unet": ComponentSpec(name="unet", type_hint=("diffusers", "UNet2DConditionModel"), repo="a/b", subfolder="unet", variant="fp16", dtype="float16"),
        "guider": ComponentSpec(name="guider", type_hint=("diffusers", "ClassifierFreeGuidance"), config={"guidance_scale": 5.0}),
    }
    write_modular_index(tmp_path, specs, class_name="MyPipeline", settings={"family": "sdxl"})
    raw = json.loads((tmp_path / "modular_model_index.json").read_text())
    assert raw["unet"][:2] == ["diffusers", "UNet2DConditionModel"]
    assert raw["unet"][2]["pretrained_model_name_or_path"] == "a/b"
    index = read_index(tmp_path)
    assert index.components == specs
    assert index.settings["family"] == "sdxl"


def test_spec_validation_and_load_id() -> None:
    with pytest.raises(ValueError, match="dtype 'float8' is not one of"):
        ComponentSpec(name="unet", dtype="float8")
    spec = ComponentSpec(name="unet", repo="a/b", subfolder="unet", dtype="torch.float16")
    assert spec.torch_dtype is torch.float16
    assert spec.load_id == "a/b|unet||main|float16|?"


def test_index_from_hub_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "model_index.json").write_text(json.dumps(SD15_MODEL_INDEX))
    cache = use_hub_cache(monkeypatch, tmp_path / "cache")
    add_cached_repo(cache, "org/sd15", source, commit="a" * 40)
    index = read_index("org/sd15")
    assert index.components["unet"].repo == "org/sd15"
    with pytest.raises(FileNotFoundError, match="'org/missing' is neither a local folder nor a repository in the Hugging Face cache"):
        read_index("org/missing")
    with pytest.raises(FileNotFoundError, match="at revision 'v2'"):
        read_index("org/sd15", revision="v2")


class Loadable(Denoiser):
    """A toy model with the loading classmethod the manager calls."""

    loads = 0

    @classmethod
    def from_pretrained(cls, path: str, *, subfolder: str | None = None, revision: str | None = None, dtype: Any = None) -> Loadable:
        cls.loads += 1
        model = cls(float(json.loads((Path(path) / (subfolder or "") / "config.json").read_text())["gain"]))
        return model.to(dtype) if dtype is not None else model


@pytest.fixture
def toy_registry() -> Registry:
    registry = Registry("component", entry_point_group=None)
    registry.register(("tests", "Loadable"), Loadable)
    registry.register(("transformers", "CLIPTextModel"), "transformers:CLIPTextModel")
    registry.register(("transformers", "CLIPTokenizer"), "transformers:CLIPTokenizer")
    return registry


def make_repo(root: Path, gain: float = 0.3) -> Path:
    (root / "denoiser").mkdir(parents=True)
    (root / "denoiser" / "config.json").write_text(json.dumps({"gain": gain}))
    index = {"_class_name": "Toy", "denoiser": ["tests", "Loadable"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_manager_loads_lazily_and_shares_between_pipelines(tmp_path: Path, toy_registry: Registry) -> None:
    repo = make_repo(tmp_path / "repo")
    manager = ComponentsManager(registry=toy_registry)
    keys = manager.add_from_index(str(repo), dtype="float64")
    Loadable.loads = 0
    spec = manager.spec(keys["denoiser"])
    assert spec is not None
    first = Pipeline(toy_blocks(), {"denoiser": spec, "decoder": Decoder()}, manager=manager, name="first")
    second = Pipeline(toy_blocks(), {"denoiser": spec, "decoder": Decoder()}, manager=manager, name="second")
    assert Loadable.loads == 0 and not manager.is_loaded(keys["denoiser"])  # the plan was checked without loading
    first(progress=False)
    second(progress=False)
    assert Loadable.loads == 1
    assert first.components["denoiser"] is second.components["denoiser"]
    row = next(r for r in manager.table() if r.name == "denoiser")
    assert (row.loaded, row.device, row.dtype, row.memory_bytes, row.users) == (True, "cpu", "float64", 8, ("first", "second"))
    assert "denoiser" in repr(manager) and "Loadable" in repr(manager)


def test_unload_frees_and_reloads_on_next_use(tmp_path: Path, toy_registry: Registry) -> None:
    manager = ComponentsManager(registry=toy_registry)
    key = manager.add_from_index(str(make_repo(tmp_path / "repo")))["denoiser"]
    pipe = Pipeline(toy_blocks(), {"denoiser": manager.spec(key), "decoder": Decoder()}, manager=manager)
    pipe(progress=False)
    Loadable.loads = 0
    manager.unload("denoiser")
    assert not manager.is_loaded(key)
    pipe(progress=False)
    assert Loadable.loads == 1
    with pytest.raises(ValueError, match="added as an object"):
        manager.unload(pipe.component_keys()["decoder"])


def test_unknown_type_hint_fails_when_the_pipeline_is_built(tmp_path: Path, toy_registry: Registry) -> None:
    manager = ComponentsManager(registry=toy_registry)
    spec = ComponentSpec(name="denoiser", type_hint=("tests", "Nope"), repo=str(tmp_path))
    with pytest.raises(LookupError, match="component tests.Nope is not allowed. Allowed components: tests.Loadable"):
        Pipeline(toy_blocks(), {"denoiser": spec, "decoder": Decoder()}, manager=manager)


def test_unknown_component_name_lists_known() -> None:
    manager = ComponentsManager()
    manager.add("vae", torch.nn.Identity())
    with pytest.raises(KeyError, match="no component 'unet' in the manager; known names: vae"):
        manager.get("unet")


def test_transformers_text_encoder_and_tokenizer_from_a_cached_hub_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toy_registry: Registry
) -> None:
    source = tmp_path / "src"
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    CLIPTextModel(config).save_pretrained(source / "text_encoder")
    CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR).save_pretrained(source / "tokenizer")
    index = {"_class_name": "X", "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    (source / "model_index.json").write_text(json.dumps(index))
    cache = use_hub_cache(monkeypatch, tmp_path / "cache")
    add_cached_repo(cache, "org/clip-tiny", source)
    manager = ComponentsManager(registry=toy_registry)
    keys = manager.add_from_index("org/clip-tiny", dtype="float16")
    encoder = manager.get(keys["text_encoder"])
    tokenizer = manager.get(keys["tokenizer"])
    assert isinstance(encoder, CLIPTextModel) and encoder.dtype == torch.float16 and not encoder.training
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_transformers_pickle_checkpoints_are_refused(tmp_path: Path, toy_registry: Registry) -> None:
    folder = tmp_path / "text_encoder"
    config = CLIPTextConfig(vocab_size=100, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    CLIPTextModel(config).save_pretrained(folder, safe_serialization=False)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    manager = ComponentsManager(registry=toy_registry)
    spec = ComponentSpec(name="text_encoder", type_hint=("transformers", "CLIPTextModel"), repo=str(tmp_path), subfolder="text_encoder")
    key = manager.add("text_encoder", spec)
    with pytest.raises(FileNotFoundError, match="has no safetensors weights"):
        manager.get(key)


def test_optional_component_may_be_missing() -> None:
    from diffblocks.blocks import Block, BlockIO, Sequence, component

    class MaybeRefine(Block):
        """Uses a refiner when one is given."""

        class Inputs(BlockIO):
            x: int = 1

        class Outputs(BlockIO):
            y: int

        refiner: torch.nn.Module = component(optional=True)

        def __call__(self, inputs: Inputs) -> Outputs:
            return self.Outputs(y=inputs.x if self.refiner is None else inputs.x * 10)

    assert Pipeline(Sequence(MaybeRefine()))(progress=False).y == 1
    assert Pipeline(Sequence(MaybeRefine()), {"refiner": torch.nn.Identity()})(progress=False).y == 10


def test_manager_moves_removes_and_releases() -> None:
    manager = ComponentsManager()
    key = manager.add("proj", torch.nn.Linear(2, 2), user="a")
    manager.to("cpu")
    assert manager.table()[0].device == "cpu"
    manager.release(key, user="a")
    assert manager.keys() == []
    key = manager.add("proj", torch.nn.Linear(2, 2))
    manager.remove("proj")
    with pytest.raises(KeyError, match="known names: none"):
        manager.get(key)


def test_a_model_given_only_as_a_config_is_refused_unless_random_weights_are_asked_for() -> None:
    config = {
        "block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4, "cross_attention_dim": 8,
        "attention_head_dim": 2, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    }
    spec = ComponentSpec(name="unet", type_hint=("diffusers", "UNet2DConditionModel"), config=config)
    manager = ComponentsManager()
    with pytest.raises(ValueError, match=r"component 'unet' is a UNet2DConditionModel given only as a config: it would be built with random weights"):
        manager.add("unet", spec)
    key = manager.add("unet", spec.with_(random_weights=True))
    assert manager.get(key).params.block_out_channels == (8, 16)
    guider = ComponentSpec(name="guider", type_hint=("diffusers", "ClassifierFreeGuidance"), config={"guidance_scale": 5.0})
    assert manager.get(manager.add("guider", guider)).guidance_scale == 5.0  # no weights: configs are what it is made of


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_a_device_this_machine_lacks_is_refused_when_the_manager_is_made_or_moved(device: str) -> None:
    with pytest.raises(ValueError, match=rf"device '{device}': CUDA is not available on this machine .*use device='cpu'"):
        ComponentsManager(device=device)
    manager = ComponentsManager()
    with pytest.raises(ValueError, match="CUDA is not available"):
        manager.to(device)
    assert manager.device is None  # unchanged
    with pytest.raises(ValueError, match=r"device 'gpu' is not a device: .*use 'cpu', 'cuda'"):
        ComponentsManager(device="gpu")


def test_dtype_names() -> None:
    from diffblocks.components.specs import dtype_name

    assert dtype_name(torch.float64) == dtype_name("torch.float64") == "float64"
    with pytest.raises(ValueError, match=r"dtype torch\.int8 is not one of .* \(integer weights come from a quantizer"):
        dtype_name(torch.int8)
