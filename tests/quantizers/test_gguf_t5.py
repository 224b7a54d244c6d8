"""T5 encoder GGUF files (llama.cpp's keys) in transformers' T5EncoderModel, against transformers' own GGUF loader."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

import gguf  # noqa: E402
from transformers import T5Config, T5EncoderModel  # noqa: E402

from diffblocks.blocks import Pipeline  # noqa: E402
from diffblocks.components.models.gguf_t5 import T5_ENCODER_KEYS, load_gguf_text_encoder  # noqa: E402
from diffblocks.components.models.loading import CheckpointError  # noqa: E402
from diffblocks.components.quantizers import GGUFLinear, GGUFQuantizer, quantizer_of  # noqa: E402
from tests.quantizers.gguf_files import K_QUANTS, encode, write_gguf  # noqa: E402

# widths of 256, so that every K-quant (blocks of 256) fits the linear rows
CONFIG = T5Config(
    vocab_size=96, d_model=256, d_kv=64, num_heads=4, d_ff=512, num_layers=2, relative_attention_num_buckets=8,
    feed_forward_proj="gated-gelu", is_encoder_decoder=False,
)
TYPES = ("Q8_0", "Q4_0", "Q5_1", *K_QUANTS, "F16")
_TO_LLAMA = {inner: short for short, inner in T5_ENCODER_KEYS.items()}


def llama_name(key: str) -> str:
    """llama.cpp's name for a transformers T5 encoder key (the inverse of the table under test)."""
    if key == "shared.weight":
        return "token_embd.weight"
    if key == "encoder.final_layer_norm.weight":
        return "enc.output_norm.weight"
    parts = key.split(".")
    inner = ".".join(parts[3:-1]).replace("DenseReluDense.wi", "DenseReluDense.wi_1") if parts[-2] == "wi" else ".".join(parts[3:-1])
    return f"enc.blk.{parts[2]}.{_TO_LLAMA[inner]}.{parts[-1]}"


def write_t5_gguf(
    path: Path, model: T5EncoderModel, weight_type: str, *, metadata: bool = True, extra: Mapping[str, Any] | None = None
) -> Path:
    """``model`` as llama.cpp writes a T5 encoder: its keys, ``t5encoder`` metadata, 2-D weights as ``weight_type``."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "t5encoder")
    if metadata:
        writer.add_context_length(512)
        writer.add_block_count(config.num_layers)
        writer.add_feed_forward_length(config.d_ff)
        writer.add_embedding_length(config.d_model)
        writer.add_key_length(config.d_kv)
        writer.add_value_length(config.d_kv)
        writer.add_head_count(config.num_heads)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        writer.add_relative_attn_buckets_count(config.relative_attention_num_buckets)
        writer.add_vocab_size(config.vocab_size)
    rng = np.random.default_rng(0)
    block = 256 if weight_type in K_QUANTS else 32
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for key, tensor in model.state_dict().items():
        if key == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight; the file stores it once
        name = llama_name(key)
        quantizable = tensor.ndim == 2 and "attn_rel_b" not in name and tensor.shape[1] % block == 0
        kind = weight_type if quantizable else "F32"
        tensors[name] = (kind, encode(kind, tensor, rng))
    tensors.update(extra or {})
    for name, (kind, array) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=None if kind in ("F32", "F16") else gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def floats() -> T5EncoderModel:
    torch.manual_seed(0)
    return T5EncoderModel(CONFIG).eval()


def _embeddings(model: torch.nn.Module, vocab_size: int = CONFIG.vocab_size) -> torch.Tensor:
    ids = torch.randint(0, vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids).last_hidden_state


def _transformers(path: Path, config: T5Config = CONFIG) -> T5EncoderModel:
    return T5EncoderModel.from_pretrained(str(path.parent), gguf_file=path.name, config=config, dtype=torch.float32).eval()


@pytest.mark.parametrize("weight_type", TYPES)
def test_same_embeddings_as_transformers_gguf_loader_with_weights_kept_quantized(
    floats: T5EncoderModel, tmp_path: Path, weight_type: str
) -> None:
    path = write_t5_gguf(tmp_path / f"t5-{weight_type}.gguf", floats, weight_type)
    ours = load_gguf_text_encoder(path, config=CONFIG, quantizer=GGUFQuantizer("float32"))
    attention = ours.encoder.block[0].layer[0].SelfAttention
    feed_forward = ours.encoder.block[1].layer[1].DenseReluDense
    if weight_type != "F16":
        assert all(isinstance(layer, GGUFLinear) for layer in (attention.q, attention.k, attention.v, attention.o))
        assert isinstance(feed_forward.wi_0, GGUFLinear) and isinstance(feed_forward.wi_1, GGUFLinear)
    assert isinstance(feed_forward.wo, torch.nn.Linear)  # transformers casts to wo.weight's dtype: kept float
    assert ours.encoder.embed_tokens is ours.shared
    assert quantizer_of(ours) == GGUFQuantizer("float32")
    embeddings = _embeddings(ours)
    # transformers dequantizes with the gguf package, which ours equals to the last bit in float32
    torch.testing.assert_close(embeddings, _embeddings(_transformers(path)), rtol=0, atol=1e-5)
    if weight_type not in K_QUANTS:  # K-quant files hold random blocks, not the float weights
        assert (embeddings - _embeddings(floats)).abs().max() > 1e-4  # the quantization is real


def test_config_read_from_the_file_and_memory_smaller(floats: T5EncoderModel, tmp_path: Path) -> None:
    path = write_t5_gguf(tmp_path / "t5-Q8_0.gguf", floats, "Q8_0")
    ours = load_gguf_text_encoder(path, quantizer=GGUFQuantizer(torch.float32))
    for field in ("d_model", "d_kv", "num_heads", "d_ff", "num_layers", "vocab_size", "relative_attention_num_buckets"):
        assert getattr(ours.config, field) == getattr(CONFIG, field), field
    assert ours.config.is_gated_act and ours.config.dense_act_fn == "gelu_new"  # T5 v1.1
    torch.testing.assert_close(_embeddings(ours), _embeddings(_transformers(path)), rtol=0, atol=1e-5)

    def nbytes(model: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))

    assert nbytes(ours) < 0.6 * nbytes(floats)


def test_bfloat16_compute_and_a_config_folder(floats: T5EncoderModel, tmp_path: Path) -> None:
    path = write_t5_gguf(tmp_path / "t5-Q8_0.gguf", floats, "Q8_0")
    CONFIG.save_pretrained(tmp_path / "text_encoder_2")
    ours = load_gguf_text_encoder(path, config=tmp_path / "text_encoder_2")
    assert ours.shared.weight.dtype == torch.bfloat16
    reference = _embeddings(load_gguf_text_encoder(path, config=CONFIG, quantizer=GGUFQuantizer("float32")))
    assert (_embeddings(ours).float() - reference).abs().max() < 0.1


def test_float16_keeps_the_last_projection_in_float32(floats: T5EncoderModel, tmp_path: Path) -> None:
    path = write_t5_gguf(tmp_path / "t5-Q8_0.gguf", floats, "Q8_0")
    ours = load_gguf_text_encoder(path, config=CONFIG, quantizer=GGUFQuantizer("float16"))
    assert ours.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert ours.encoder.block[0].layer[0].SelfAttention.q.compute_dtype == torch.float16


def test_ungated_t5_and_whole_t5_decoder_skipped(tmp_path: Path) -> None:
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, is_encoder_decoder=False)
    torch.manual_seed(1)
    model = T5EncoderModel(config).eval()
    decoder = {"dec.blk.0.attn_q.weight": ("F32", np.zeros((32, 32), np.float32))}
    path = write_t5_gguf(tmp_path / "t5-relu.gguf", model, "Q8_0", extra=decoder)
    ours = load_gguf_text_encoder(path, config=config, quantizer=GGUFQuantizer("float32"))
    assert isinstance(ours.encoder.block[0].layer[1].DenseReluDense.wi, GGUFLinear)
    assert (_embeddings(ours, 64) - _embeddings(model, 64)).abs().max() < 0.5


def test_in_a_flux_pipeline_same_image_as_diffusers_with_transformers_gguf_encoder(tmp_path: Path) -> None:
    import diffusers

    from tests.presets.flux_fixtures import tiny_flux

    repo = tiny_flux(tmp_path / "flux")
    t5 = T5EncoderModel.from_pretrained(repo / "text_encoder_2").eval()
    path = write_t5_gguf(tmp_path / "t5-Q8_0.gguf", t5, "Q8_0")
    encoder = load_gguf_text_encoder(path, config=repo / "text_encoder_2", quantizer=GGUFQuantizer("float32"))
    assert isinstance(encoder.encoder.block[0].layer[0].SelfAttention.q, GGUFLinear)
    kwargs: dict[str, Any] = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, max_sequence_length=16)
    pipe = Pipeline.from_pretrained(str(repo), components={"text_encoder_2": encoder})
    ours = pipe(**kwargs, generator=torch.Generator().manual_seed(7), output_type="np", progress=False).images
    theirs_encoder = _transformers(path, config=t5.config)
    reference = diffusers.FluxPipeline.from_pretrained(repo, text_encoder_2=theirs_encoder)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(**kwargs, generator=torch.Generator().manual_seed(7), output_type="np").images
    assert np.abs(np.asarray(ours) - np.asarray(theirs)).max() <= 1e-5
    row = {row.name: row for row in pipe.memory()}["text_encoder_2"]
    assert row.quantizer == "GGUFQuantizer(compute_dtype='float32')"


# --- bad files -------------------------------------------------------------------------------------------


def test_a_flux_file_is_refused_naming_its_architecture(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "flux.gguf", {"img_in.weight": ("F32", np.zeros((4, 4), np.float32))})
    with pytest.raises(CheckpointError, match="architecture 'flux', not a T5 encoder"):
        load_gguf_text_encoder(path, config=CONFIG)


def test_wrong_shape_names_the_tensor(floats: T5EncoderModel, tmp_path: Path) -> None:
    path = write_t5_gguf(tmp_path / "t5.gguf", floats, "Q8_0")
    small = T5Config(**{**CONFIG.to_dict(), "d_ff": 256})
    with pytest.raises(CheckpointError, match=r"'enc\.blk\.0\.ffn_gate\.weight'.*\(256, 256\)"):
        load_gguf_text_encoder(path, config=small)


def test_unknown_and_missing_tensors_are_listed(floats: T5EncoderModel, tmp_path: Path) -> None:
    extra = {"enc.blk.0.attn_qkv.weight": ("F32", np.zeros((4, 4), np.float32))}
    path = write_t5_gguf(tmp_path / "t5.gguf", floats, "Q8_0", extra=extra)
    deeper = T5Config(**{**CONFIG.to_dict(), "num_layers": 3})
    with pytest.raises(CheckpointError, match=r"(?s)missing tensors: encoder\.block\.2\..*no place for: enc\.blk\.0\.attn_qkv"):
        load_gguf_text_encoder(path, config=deeper)


def test_no_metadata_and_no_config_says_pass_config(floats: T5EncoderModel, tmp_path: Path) -> None:
    path = write_t5_gguf(tmp_path / "t5.gguf", floats, "Q8_0", metadata=False)
    with pytest.raises(CheckpointError, match="pass config="):
        load_gguf_text_encoder(path)


def test_truncated_file(floats: T5EncoderModel, tmp_path: Path) -> None:
    path = write_t5_gguf(tmp_path / "t5.gguf", floats, "Q8_0")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_gguf_text_encoder(path, config=CONFIG)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_gguf_text_encoder(tmp_path / "absent.gguf", config=CONFIG)
