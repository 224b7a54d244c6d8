"""Disk offload: weights wait in a memory-mapped safetensors file, images are unchanged, CPU memory holds about one group."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from diffblocks.components.memory import Mover, measure
from diffblocks.components.memory.disk import DiskOffload, MappedFile, is_mapped, map_model, register_weight_files, write_aligned
from tests.memory.anon_memory import probe_env
from tests.memory.test_policies import Toy


def test_write_aligned_maps_back_every_dtype_at_64_byte_boundaries(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(5), "d": torch.ones(0),
               "e": torch.tensor([True, False])}
    with open(tmp_path / "w.safetensors", "wb") as f:
        write_aligned(f, tensors.items())
    mapped = MappedFile(tmp_path / "w.safetensors")
    for name, tensor in tensors.items():
        view = mapped.tensor(name)
        assert view.dtype == tensor.dtype and torch.equal(view, tensor)
        assert view.numel() == 0 or view.data_ptr() % 64 == 0
    from safetensors.torch import load_file  # the file is a safetensors file for any reader

    assert torch.equal(load_file(tmp_path / "w.safetensors")["b"], tensors["b"])


def test_map_model_takes_matching_tensors_from_the_source_file_and_writes_the_rest(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = Toy()
    save_file({k: v for k, v in model.state_dict().items() if not k.startswith("head")}, tmp_path / "m.safetensors")
    params = list(model.parameters())
    expected = [p.detach().clone() for p in params]
    register_weight_files(model, [tmp_path / "m.safetensors"])
    mapped = map_model(model, aligned=False)
    head = sum(p.numel() * 4 for p in model.head.parameters())
    assert (mapped.from_source, mapped.written) == (measure(model).total - head, head)
    assert list(model.parameters()) == params  # the same Parameter objects, their data swapped
    assert all(torch.equal(p, e) for p, e in zip(params, expected))
    assert map_model(model, aligned=False).already == measure(model).total  # attached again: nothing is written twice


def test_map_model_writes_a_tensor_whose_values_differ_from_the_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = Toy()
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    with torch.no_grad():
        model.embed.weight.add_(1)  # a fused adapter, say: the file no longer holds this weight
    register_weight_files(model, [tmp_path / "m.safetensors"])
    assert map_model(model, aligned=False).written == 4 * 4 * 4


def test_disk_offload_gives_the_same_outputs_and_detaches() -> None:
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(3, 4)
    expected = model(x)
    attached = DiskOffload().attach("m", model, Mover("cpu"))
    for _ in range(2):  # the second call prefetches
        assert torch.equal(model(x), expected)
    attached.detach()
    assert not model.blocks[0]._forward_pre_hooks
    assert torch.equal(model(x), expected)


def test_disk_offload_a_layer_at_a_time_streams_every_layer_from_the_map_and_keeps_none() -> None:
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(3, 4)
    expected = model(x)
    moves: list[tuple[str, str]] = []
    mover = Mover("cpu", on_move=lambda name, device, size: moves.append((name, str(device))))
    attached = DiskOffload(leaf=True).attach("m", model, mover)
    assert is_mapped(model) and not moves  # attached: every weight a view of the map, none fetched yet
    for _ in range(2):
        moves.clear()
        assert torch.equal(model(x), expected)
        assert is_mapped(model)  # each layer went back to the very tensors of the map
        layers = ["m/embed", *(f"m/blocks.{i}.{j}" for i in range(4) for j in range(2)), "m/head"]
        assert moves == [move for name in layers for move in ((name, "cpu"), (name, "cpu"))]  # in, home, nothing ahead
    attached.detach()
    assert not model.blocks[0][0]._forward_pre_hooks and not model._forward_pre_hooks
    assert torch.equal(model(x), expected)


def test_disk_offload_plans_like_group_offload_on_the_device() -> None:
    from diffblocks.components.memory import GroupOffload, LeafOffload

    size = measure(Toy())
    assert DiskOffload(2).peak([size]) == GroupOffload(2).peak([size])
    assert DiskOffload(1, prefetch=False).peak([size]) == GroupOffload(1, prefetch=False).peak([size])
    assert repr(DiskOffload(1, prefetch=False)) == "DiskOffload(blocks_per_group=1, prefetch=False)"
    assert DiskOffload(leaf=True).peak([size]) == LeafOffload().peak([size])
    assert repr(DiskOffload(leaf=True)) == "DiskOffload(leaf=True)" and DiskOffload(leaf=True) == DiskOffload(prefetch=False, leaf=True)


def test_disk_offload_refuses_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="blocks_per_group 0 must be >= 1"):
        DiskOffload(0)
    with pytest.raises(ValueError, match="is not a folder: give an existing folder"):
        DiskOffload(folder=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="leaf=True streams each layer alone: blocks_per_group 2 does not apply"):
        DiskOffload(2, leaf=True)


@pytest.mark.parametrize("leaf", [False, True])
def test_a_pipeline_under_disk_offload_makes_the_same_image(tmp_path: Path, leaf: bool) -> None:
    from diffblocks.blocks import Pipeline
    from diffblocks.components import ComponentsManager
    from diffblocks.presets.tiny.preset import builtin_model_dir

    kwargs = {"prompt": "a small green cross in the center", "num_inference_steps": 3, "progress": False}
    manager = ComponentsManager(device="cpu", offload=DiskOffload(folder=str(tmp_path), leaf=leaf))
    image = Pipeline.from_pretrained(builtin_model_dir(), manager=manager)(generator=torch.Generator().manual_seed(0), **kwargs)
    plain = Pipeline.from_pretrained(builtin_model_dir())(generator=torch.Generator().manual_seed(0), **kwargs)
    assert np.array_equal(np.asarray(image.images[0]), np.asarray(plain.images[0]))
    assert os.listdir(tmp_path) == []  # the written file is unlinked: the map holds it, nothing is left behind


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: each layer copied from the map to a real device")
@pytest.mark.parametrize("leaf", [False, True])
def test_on_cuda_disk_offload_makes_the_same_image_and_streams_from_the_map(tmp_path: Path, leaf: bool) -> None:
    from diffblocks.blocks import Pipeline
    from diffblocks.components import ComponentsManager
    from diffblocks.presets.tiny.preset import builtin_model_dir

    kwargs = {"prompt": "a small green cross in the center", "num_inference_steps": 3, "progress": False}
    plain = Pipeline.from_pretrained(builtin_model_dir(), manager=ComponentsManager(device="cuda"))
    expected = np.asarray(plain(generator=torch.Generator().manual_seed(0), **kwargs).images[0])
    del plain
    manager = ComponentsManager(device="cuda", offload=DiskOffload(folder=str(tmp_path), leaf=leaf))
    pipe = Pipeline.from_pretrained(builtin_model_dir(), manager=manager)
    for _ in range(2):  # the second call runs with what the first learned (prefetch order)
        image = np.asarray(pipe(generator=torch.Generator().manual_seed(0), **kwargs).images[0])
        assert np.array_equal(image, expected)
    unet = pipe.components["unet"]
    assert all(p.device.type == "cpu" for p in unet.down_blocks.parameters())  # the streamed blocks went home
    assert is_mapped(unet)  # home is the map itself: nothing was copied into CPU memory on the way


_PROBE = r"""
import sys
import torch
from diffblocks.components.memory import Mover, measure
from diffblocks.components.memory.disk import DiskOffload, register_weight_files
from diffblocks.components.memory.streams import Synchronous
from diffblocks.components.models.unet import UNet2DConditionModel
from tests.memory.anon_memory import anon, peak_during

class Copying(Synchronous):  # the device stand-in: a fetched group is a real copy in memory, as it would be on a GPU
    def copy(self, label, tensors):
        return [t.clone() for t in tensors], None

model = UNet2DConditionModel.from_pretrained(sys.argv[1])
size = measure(model)
register_weight_files(model, sorted(__import__("pathlib").Path(sys.argv[1]).glob("*.safetensors")))
sample = torch.randn(1, 4, 16, 16); text = torch.randn(1, 8, 256)

def call_peak():  # the most anonymous memory above the start while the model runs three times
    def run():
        with torch.inference_mode():
            for _ in range(3):
                model(sample, 10, text)
    return peak_during(run)[0]

activations = call_peak()  # the weights in memory already: what a call adds of its own
loaded = anon()
policy = DiskOffload(leaf=True, folder=sys.argv[2]) if sys.argv[3] == "leaf" else DiskOffload(1, prefetch=False, folder=sys.argv[2])
policy.attach("unet", model, Mover("cpu", streams=Copying(torch.device("cpu"))))
dropped = loaded - anon()
print(dropped, call_peak(), activations, size.total, size.largest_leaf if sys.argv[3] == "leaf" else size.largest_group(1))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc (Linux)")
@pytest.mark.parametrize("unit", ["group", "leaf"])
def test_disk_offload_holds_about_one_group_or_layer_in_cpu_memory(tmp_path: Path, unit: str) -> None:
    from diffblocks.components.models.unet import UNet2DConditionModel
    from tests.memory.test_loading_peak import CONFIG

    UNet2DConditionModel.from_config(CONFIG).save_pretrained(tmp_path)  # float32, as it loads: mapped, not written
    done = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path), tempfile.gettempdir(), unit], capture_output=True,
                          text=True, check=True, env=probe_env())
    dropped, peak, activations, total, group = map(int, done.stdout.split()[-5:])
    assert total > 30 * 2**20 and group < total / 2
    assert dropped > 0.9 * total, f"mapping gave back {dropped / 2**20:.0f} MiB of a {total / 2**20:.0f} MiB model"
    # the one group (or layer) on the "device" (a copy in memory) and the call's own activations, never the model
    assert peak < group + activations + 4 * 2**20, (
        f"a call held {peak / 2**20:.0f} MiB for a {group / 2**20:.0f} MiB {unit} and {activations / 2**20:.0f} MiB of activations"
    )


def test_mapped_file_reads_an_open_file() -> None:
    with tempfile.TemporaryFile() as f:
        write_aligned(f, [("w", torch.arange(4.0))])
        assert torch.equal(MappedFile(f).tensor("w"), torch.arange(4.0))
