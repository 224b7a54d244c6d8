"""Loading straight into memory maps: each weight a view of its file, the casts written one at a time, CPU memory near one tensor."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from diffblocks.components.memory import ByteSize, DiskOffload, MemoryBudgetError, ModelOffload, NoOffload, plan_memory
from diffblocks.components.memory.disk import MappedFile, MemoryMap, is_mapped, write_aligned, write_lazily
from diffblocks.components.memory.estimate import mapped_loading_peak
from diffblocks.components.memory.planner import host_peak
from diffblocks.components.models.unet import UNet2DConditionModel
from tests.memory.test_planner import FLUX
from tests.memory.anon_memory import probe_env

SMALL = {"sample_size": 8, "block_out_channels": (32, 64), "layers_per_block": 1, "cross_attention_dim": 32,
         "attention_head_dim": 8, "norm_num_groups": 8, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
         "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}


def _saved(folder: Path, dtype: torch.dtype = torch.float32, **save: object) -> UNet2DConditionModel:
    torch.manual_seed(0)
    model = UNet2DConditionModel.from_config(SMALL).to(dtype)
    model.save_pretrained(folder, **save)  # type: ignore[arg-type]
    return model


def _same(a: torch.nn.Module, b: torch.nn.Module, *, run: bool = True) -> None:
    """The same tensors, and (``run``: both aligned, so the same kernels) the same outputs."""
    left, right = a.state_dict(), b.state_dict()
    assert list(left) == list(right)
    for key in left:
        assert left[key].dtype == right[key].dtype and torch.equal(left[key], right[key]), key
    if not run:
        return
    dtype = next(a.parameters()).dtype
    sample, text = torch.randn(1, 4, 8, 8, dtype=dtype), torch.randn(1, 5, 32, dtype=dtype)
    with torch.inference_mode():
        assert torch.equal(a(sample, 10, text), b(sample, 10, text))


def _size(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_write_lazily_makes_each_tensor_when_its_turn_comes(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.ones(0)}
    made: list[str] = []

    def make(name: str) -> torch.Tensor:
        made.append(name)
        assert len(made) == len(set(made))  # once each, in file order
        return tensors[name]

    with open(tmp_path / "w.safetensors", "wb") as f:
        write_lazily(f, [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()], make)
    eagerly = io.BytesIO()
    write_aligned(eagerly, tensors.items())
    assert made == ["a", "b"]  # an empty tensor is never made
    assert (tmp_path / "w.safetensors").read_bytes() == eagerly.getvalue()
    mapped = MappedFile(tmp_path / "w.safetensors")
    assert all(torch.equal(mapped.tensor(name), t) for name, t in tensors.items())


@pytest.mark.parametrize("aligned", [True, False])
def test_a_file_at_the_dtype_it_loads_as_is_mapped_not_read(tmp_path: Path, aligned: bool) -> None:
    plain = _saved(tmp_path)
    model = UNet2DConditionModel.from_pretrained(tmp_path, memory_map=MemoryMap(aligned=aligned))
    _same(model, plain, run=aligned)  # unaligned views take other kernels, which round differently
    assert is_mapped(model) and not is_mapped(UNet2DConditionModel.from_pretrained(tmp_path))
    views = [t for t in model.state_dict().values() if t.numel()]
    assert not aligned or all(t.data_ptr() % 64 == 0 for t in views)


def test_a_file_of_another_dtype_is_cast_into_a_file_of_its_own(tmp_path: Path) -> None:
    from diffblocks.components.models.loading import find_weight_files, load_weights_mapped

    _saved(tmp_path, torch.float16)
    for dtype in (None, torch.bfloat16):  # float16 weights loaded as float32 (as built), and as bfloat16
        with torch.device("meta"):
            model = UNet2DConditionModel.from_config(SMALL)
        mapped = load_weights_mapped(model, find_weight_files(tmp_path), dtype=dtype, memory_map=MemoryMap(folder=str(tmp_path)))
        _same(model.eval(), UNet2DConditionModel.from_pretrained(tmp_path, dtype=dtype))
        assert (mapped.from_source, mapped.written) == (0, _size(model))  # every float weight was cast
        assert {t.dtype for t in model.parameters()} == {dtype or torch.float32}
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]  # nothing left behind


def test_a_sharded_folder_maps_every_shard(tmp_path: Path) -> None:
    from diffblocks.components.memory.disk import weight_files
    from diffblocks.components.models.loading import find_weight_files, load_weights_mapped

    plain = _saved(tmp_path, max_shard_size="200KB")
    files = find_weight_files(tmp_path)
    assert len(files) > 3
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(SMALL)
    mapped = load_weights_mapped(model, files, memory_map=MemoryMap(aligned=False))
    assert (mapped.from_source, mapped.written) == (_size(plain), 0)
    _same(model.eval(), plain, run=False)  # unaligned views
    assert weight_files(model) == tuple(files)
    _same(UNet2DConditionModel.from_pretrained(tmp_path, memory_map=MemoryMap()), plain)  # aligned: some copied to its own file


def test_disk_offload_keeps_the_maps_the_loader_made(tmp_path: Path) -> None:
    from diffblocks.components.memory import Mover
    from diffblocks.components.memory.disk import map_model

    _saved(tmp_path, torch.float16)
    model = UNet2DConditionModel.from_pretrained(tmp_path, memory_map=MemoryMap())
    pointers = [t.data_ptr() for t in model.state_dict().values()]
    assert map_model(model).written == 0  # attached after loading: nothing is written again
    attached = DiskOffload(1).attach("unet", model, Mover("cpu"))
    attached.detach()
    assert [t.data_ptr() for t in model.state_dict().values()] == pointers


def test_memory_map_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    _saved(tmp_path)
    with pytest.raises(ValueError, match=r"memory_map= keeps the weights in files mapped into CPU memory, so it takes neither device='meta'"):
        UNet2DConditionModel.from_pretrained(tmp_path, device="meta", memory_map=MemoryMap())
    with pytest.raises(ValueError, match="MemoryMap: folder .* is not a folder: give an existing folder"):
        MemoryMap(folder=str(tmp_path / "nowhere"))


def test_a_corrupt_file_is_reported_before_anything_is_mapped(tmp_path: Path) -> None:
    from diffblocks.components.models.loading import CheckpointError

    _saved(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        UNet2DConditionModel.from_pretrained(tmp_path, memory_map=MemoryMap())


def test_what_loading_needs_is_read_from_the_headers(tmp_path: Path) -> None:
    from transformers import BertModel

    model = _saved(tmp_path, torch.float16)
    largest = max(t.numel() for t in model.state_dict().values())
    assert mapped_loading_peak(UNet2DConditionModel, folder=tmp_path) == 4 * largest  # loads as float32
    assert mapped_loading_peak(UNet2DConditionModel, folder=tmp_path, dtype=torch.float16) == 2 * largest
    assert mapped_loading_peak(BertModel, folder=tmp_path) is None  # transformers' models load through memory
    assert mapped_loading_peak(UNet2DConditionModel, folder=tmp_path / "nowhere") is None
    (tmp_path / "config.json").write_text('{"quantization_config": {}}')
    assert mapped_loading_peak(UNet2DConditionModel, folder=tmp_path) is None  # saved quantized: read into memory


# Flux.1-dev, our transformer and VAE loading straight into maps (their largest tensors: 144 MiB at bf16, 2.25 MiB)
MAPPED = {**FLUX, "transformer": replace(FLUX["transformer"], loading=144 * 2**20), "vae": replace(FLUX["vae"], loading=9 * 2**18)}


@pytest.mark.parametrize(
    ("sizes", "cpu_budget", "message"),
    [
        (FLUX, "16GiB", r"below 22.2 GiB, the size of the largest model \(transformer\), which is read into CPU memory"),
        (MAPPED, "8GiB", r"below 8.9 GiB, the size of text_encoder_2, which is read into CPU memory when it loads"),
        ({"transformer": MAPPED["transformer"]}, "100MiB",
         r"below 144.0 MiB, the largest tensor of transformer, which is made in CPU memory while transformer loads straight"),
    ],
)
def test_the_cpu_budget_minimum_is_what_loading_needs(sizes: dict, cpu_budget: str, message: str) -> None:
    with pytest.raises(MemoryBudgetError, match=message):
        plan_memory(sizes, device="cuda", budget=ByteSize.parse("12GiB"), cpu_budget=ByteSize.parse(cpu_budget))


def test_models_that_load_into_maps_need_less_than_their_size() -> None:
    models = list(MAPPED.values())
    assert host_peak(DiskOffload(1), models) == FLUX["text_encoder_2"].total  # T5 (transformers) is read into memory
    assert host_peak(NoOffload(), models) == FLUX["transformer"].total  # read into memory, then moved to the device
    plan = plan_memory(MAPPED, device="cuda", budget=ByteSize.parse("24GiB"), cpu_budget=ByteSize.parse("9GiB"))
    assert (plan.policy, plan.instead) == (DiskOffload(1), ModelOffload())  # below 22.2 GiB, refused before
    only_ours = {name: MAPPED[name] for name in ("transformer", "vae")}
    plan = plan_memory(only_ours, device="cuda", budget=ByteSize.parse("12GiB"), cpu_budget=ByteSize.parse("1GiB"))
    assert plan.policy == DiskOffload(1) and plan.host == ByteSize(144 * 2**20)


def test_a_pipeline_loaded_into_maps_makes_the_same_image(tmp_path: Path) -> None:
    from diffblocks.blocks import Pipeline
    from diffblocks.components import ComponentsManager
    from diffblocks.presets.tiny.preset import builtin_model_dir

    manager = ComponentsManager(device="cpu", memory_budget="120MiB", cpu_memory_budget="100MiB")
    pipe = Pipeline.from_pretrained(builtin_model_dir(), manager=manager)
    plan = manager.plan()
    assert plan.policy == DiskOffload(1) and plan.sizes["unet"].loading == 2654208  # the UNet's largest tensor, 2.5 MiB
    kwargs = {"prompt": "a small green cross in the center", "num_inference_steps": 3, "progress": False}
    image = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert all(is_mapped(pipe.components[name]) for name in ("unet", "vae", "text_encoder"))
    plain = Pipeline.from_pretrained(builtin_model_dir())(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(plain))


_PROBE = r"""
import sys
from diffblocks.components import ComponentsManager, ComponentSpec
from diffblocks.components.memory import DiskOffload
from diffblocks.components.memory.disk import is_mapped
from diffblocks.components.memory.estimate import mapped_loading_peak
from diffblocks.components.models.unet import UNet2DConditionModel
from pathlib import Path
from tests.memory.anon_memory import peak_during

manager = ComponentsManager(device="cpu", offload=DiskOffload(1, folder=sys.argv[3]))
spec = ComponentSpec(name="unet", type_hint=("diffblocks", "UNet2DConditionModel"), repo=sys.argv[1], dtype=sys.argv[2])
key = manager.add("unet", spec)
manager.plan()
peak, model = peak_during(lambda: manager.get(key))  # loaded, and disk offload attached
largest = mapped_loading_peak(UNet2DConditionModel, folder=Path(sys.argv[1]), dtype=spec.torch_dtype)
print(peak, sum(t.numel() * t.element_size() for t in model.state_dict().values()), largest, int(is_mapped(model)))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc (Linux)")
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_loading_under_disk_offload_peaks_near_the_largest_tensor(tmp_path: Path, dtype: str) -> None:
    from tests.memory.test_loading_peak import CONFIG

    UNet2DConditionModel.from_config(CONFIG).to(torch.float16).save_pretrained(tmp_path)  # float32 loads cast every tensor
    done = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path), dtype, tempfile.gettempdir()], capture_output=True,
                          text=True, check=True, env=probe_env())
    peak, size, largest, mapped = map(int, done.stdout.split()[-4:])
    assert size > 30 * 2**20 and mapped == 1
    # the model through CPU memory would be 1.0x its size (tests/memory/test_loading_peak.py): here one cast tensor and change
    assert peak < min(size / 4, largest + 8 * 2**20), (
        f"loading peaked at {peak / 2**20:.1f} MiB above its start for a {size / 2**20:.0f} MiB model "
        f"whose largest tensor is {largest / 2**20:.1f} MiB"
    )
