"""transformers' models (the text encoders) load straight into memory maps under disk offload, as ours do."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from diffblocks.components.transformers_mapped import load_transformers_mapped, transformers_load_dtype, transformers_loading_peak
from diffblocks.components.memory.disk import MemoryMap, is_mapped, weight_files
from tests.memory.anon_memory import probe_env


def _t5_config(d_model: int = 16, layers: int = 2):  # noqa: ANN202 - a transformers config
    from transformers import T5Config

    return T5Config(vocab_size=128, d_model=d_model, d_kv=d_model // 4, d_ff=3 * d_model // 2, num_layers=layers, num_heads=4,
                    relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)


def _saved_t5(folder: Path, dtype: torch.dtype = torch.bfloat16, **save: object) -> None:
    from transformers import T5EncoderModel

    torch.manual_seed(0)
    T5EncoderModel(_t5_config()).to(dtype).save_pretrained(folder, **save)


@pytest.mark.parametrize("saved", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float32, torch.float16])
def test_a_t5_loaded_into_maps_is_the_model_transformers_loads(tmp_path: Path, saved: torch.dtype, dtype: torch.dtype | None) -> None:
    from transformers import T5EncoderModel

    _saved_t5(tmp_path, saved)
    mapped = load_transformers_mapped(T5EncoderModel, tmp_path, variant=None, dtype=dtype, memory_map=MemoryMap(aligned=False))
    plain = T5EncoderModel.from_pretrained(tmp_path, **({"dtype": dtype} if dtype is not None else {}))
    ours, theirs = mapped.state_dict(), plain.state_dict()
    assert list(ours) == list(theirs)
    for key in ours:  # float16 keeps T5's feed-forward outputs (wo) in float32, read from the file as they are
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    ids = torch.tensor([[3, 17, 99, 1]])
    with torch.inference_mode():
        assert torch.equal(mapped(ids).last_hidden_state, plain(ids).last_hidden_state)
    assert mapped.shared.weight is mapped.encoder.embed_tokens.weight  # tied as transformers ties them
    assert weight_files(mapped) == (tmp_path / "model.safetensors",) and not mapped.training
    assert is_mapped(mapped)  # every tensor a view of a map: nothing left in CPU memory


def test_a_sharded_variant_maps_the_shards_its_index_names(tmp_path: Path) -> None:
    import shutil

    from transformers import T5EncoderModel

    from diffblocks.components.containment import RepositoryPathError

    _saved_t5(tmp_path / "plain", torch.float32)  # the plain file beside the shards is not read
    _saved_t5(tmp_path, max_shard_size="4KB", variant="fp16")
    shutil.copy(tmp_path / "plain" / "model.safetensors", tmp_path)
    shards = sorted(tmp_path.glob("model.fp16-*-of-*.safetensors"))
    assert len(shards) > 1
    shutil.copy(shards[0], tmp_path / "model.fp16-00001-of-00009.safetensors")  # a stale shard of an earlier save
    mapped = load_transformers_mapped(T5EncoderModel, tmp_path, variant="fp16", dtype=None, memory_map=MemoryMap(aligned=False))
    assert weight_files(mapped) == tuple(shards) and is_mapped(mapped)
    assert next(mapped.parameters()).dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="no safetensors weights for variant 'int8' named as transformers names them"):
        load_transformers_mapped(T5EncoderModel, tmp_path, variant="int8", dtype=None, memory_map=MemoryMap())
    index = tmp_path / "model.safetensors.index.fp16.json"
    saved = index.read_text()
    index.write_text(saved.replace(shards[0].name, "../plain/model.safetensors"))
    with pytest.raises(RepositoryPathError):
        load_transformers_mapped(T5EncoderModel, tmp_path, variant="fp16", dtype=None, memory_map=MemoryMap())
    index.write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="names no weight files"):
        load_transformers_mapped(T5EncoderModel, tmp_path, variant="fp16", dtype=None, memory_map=MemoryMap())


def test_what_loading_a_transformers_model_into_maps_needs_is_its_largest_tensor(tmp_path: Path) -> None:
    from transformers import CLIPTextModel, T5EncoderModel

    _saved_t5(tmp_path)
    largest = 128 * 16  # the embedding, the largest tensor
    assert transformers_loading_peak(T5EncoderModel, folder=tmp_path) == 2 * largest  # at the file's own bfloat16
    assert transformers_loading_peak(T5EncoderModel, folder=tmp_path, dtype=torch.float32) == 4 * largest
    assert transformers_loading_peak(CLIPTextModel, folder=tmp_path, dtype=torch.float16) == 2 * largest
    assert transformers_loading_peak(T5EncoderModel, folder=tmp_path, variant="fp16") is None  # no such files
    assert transformers_load_dtype(T5EncoderModel, torch.float16)("encoder.block.0.layer.1.DenseReluDense.wo.weight") == torch.float32
    assert transformers_load_dtype(T5EncoderModel, torch.bfloat16)("encoder.block.0.layer.1.DenseReluDense.wo.weight") == torch.bfloat16
    config = tmp_path / "config.json"
    config.write_text(config.read_text().replace('"model_type"', '"quantization_config": {"quant_method": "bitsandbytes"}, "model_type"'))
    assert transformers_loading_peak(T5EncoderModel, folder=tmp_path) is None  # saved quantized: the backend reads it into memory


_PROBE = r"""
import sys
from diffblocks.components import ComponentsManager, ComponentSpec
from diffblocks.components.memory import DiskOffload
from diffblocks.components.memory.disk import is_mapped
from tests.memory.anon_memory import peak_during

manager = ComponentsManager(device="cpu", offload=DiskOffload(1, folder=sys.argv[3]))
spec = ComponentSpec(name="text_encoder_2", type_hint=("transformers", "T5EncoderModel"), repo=sys.argv[1], dtype=sys.argv[2])
key = manager.add("text_encoder_2", spec)
manager.plan()
peak, model = peak_during(lambda: manager.get(key))  # loaded, and disk offload attached
print(peak, sum(t.numel() * t.element_size() for t in model.state_dict().values()), int(is_mapped(model)))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc (Linux)")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_t5_under_disk_offload_loads_without_reading_its_weights_into_memory(tmp_path: Path, dtype: str) -> None:
    from transformers import T5EncoderModel

    torch.manual_seed(0)
    T5EncoderModel(_t5_config(d_model=512, layers=8)).to(torch.bfloat16).save_pretrained(tmp_path)
    done = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path), dtype, tempfile.gettempdir()], capture_output=True,
                          text=True, check=True, env=probe_env())
    peak, size, mapped = map(int, done.stdout.split()[-3:])
    assert size > 30 * 2**20 and mapped == 1
    # read into memory, loading would hold the whole model (and float32, twice the file); here a cast tensor at a time
    assert peak < size / 4, f"loading peaked at {peak / 2**20:.1f} MiB above its start for a {size / 2**20:.0f} MiB model"
