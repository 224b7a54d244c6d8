"""Read T5 encoder GGUF files (llama.cpp's keys) into transformers' ``T5EncoderModel``, linear weights kept quantized.

The Flux community runs T5-XXL from GGUF files (city96's ``t5-v1_1-xxl-encoder-Q8_0.gguf``, ...),
written by llama.cpp's converter: architecture ``t5encoder``, tensors named by llama.cpp
(``token_embd.weight``, ``enc.blk.0.attn_q.weight``). :data:`T5_ENCODER_KEYS` is the one table
between those names and transformers' (the same pairs transformers derives from gguf's tensor
name map in ``get_gguf_hf_weights_map``). Every linear weight stored in a block type becomes a
:class:`~diffblocks.components.quantizers.GGUFLinear`; the embedding, the relative attention
bias and the norm scales are dequantized into the compute dtype when the file is read.

transformers' own ``T5EncoderModel.from_pretrained(..., gguf_file=...)`` dequantizes every weight to
floats; this keeps them in their blocks (Q8_0: about a quarter of the float32 bytes).
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffblocks.components.models.gguf import GGUFTensor, assign_gguf_tensors, check_filled, check_placed, check_shape, read_gguf
from diffblocks.components.models.loading import CheckpointError
from diffblocks.components.quantizers.base import mark_quantized
from diffblocks.components.quantizers.gguf import GGUFQuantizer

if TYPE_CHECKING:
    from transformers import T5Config, T5EncoderModel

T5_ENCODER_KEYS: Mapping[str, str] = {
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",  # block 0 only, as in T5
    "attn_norm": "layer.0.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",  # gated feed-forward (T5 v1.1, Flux's T5-XXL)
    "ffn_up": "layer.1.DenseReluDense.wi_1",  # in a T5 without the gate: layer.1.DenseReluDense.wi
    "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_norm": "layer.1.layer_norm",
}
"""llama.cpp's name inside ``enc.blk.{i}.`` -> transformers' inside ``encoder.block.{i}.``."""

_TOP_KEYS: Mapping[str, str] = {"token_embd.weight": "shared.weight", "enc.output_norm.weight": "encoder.final_layer_norm.weight"}
_BLOCK = re.compile(r"enc\.blk\.(\d+)\.(\w+)\.(weight|bias)")
_DECODER = ("dec.", "output.weight")  # a whole T5's decoder and head: an encoder has no place for them
_ARCHITECTURES = ("t5encoder", "t5")
_KEPT_FLOAT = ("wo",)  # transformers' T5PreTrainedModel._keep_in_fp32_modules

# t5encoder.<key> in the file's metadata -> T5Config field (transformers' GGUF_CONFIG_MAPPING["t5"])
_METADATA: Mapping[str, str] = {
    "context_length": "n_positions",
    "block_count": "num_layers",
    "feed_forward_length": "d_ff",
    "embedding_length": "d_model",
    "attention.key_length": "d_kv",
    "attention.head_count": "num_heads",
    "attention.layer_norm_epsilon": "layer_norm_epsilon",
    "attention.relative_buckets_count": "relative_attention_num_buckets",
}

_MSG_NOT_T5 = (
    "{path} holds a GGUF model of architecture {arch!r}, not a T5 encoder ('t5encoder'); load_gguf_text_encoder "
    "reads T5 encoder files such as city96's t5-v1_1-xxl-encoder-*.gguf. For the Flux transformer or a UNet use "
    "diffblocks.components.models.gguf.load_gguf."
)
_MSG_NO_CONFIG = (
    "{path} does not record the T5 encoder's size in its metadata (missing {missing}); pass config=, e.g. "
    "T5Config.from_pretrained('black-forest-labs/FLUX.1-dev', subfolder='text_encoder_2')."
)


def t5_encoder_key(name: str, *, gated: bool = True) -> str | None:
    """transformers' ``T5EncoderModel`` key for the llama.cpp tensor ``name``, or None when it has none.

    ``gated``: the feed-forward has a gate (``wi_0``, ``wi_1``); without one, ``ffn_up`` is ``wi``.
    """
    if name in _TOP_KEYS:
        return _TOP_KEYS[name]
    match = _BLOCK.fullmatch(name)
    if match is None or match[2] not in T5_ENCODER_KEYS:
        return None
    inner = T5_ENCODER_KEYS[match[2]] if gated or match[2] != "ffn_up" else "layer.1.DenseReluDense.wi"
    return f"encoder.block.{match[1]}.{inner}.{match[3]}"


def load_gguf_text_encoder(
    path: str | os.PathLike[str],
    *,
    config: T5Config | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    quantizer: GGUFQuantizer | None = None,
    device: torch.device | str | None = None,
) -> T5EncoderModel:
    """A transformers ``T5EncoderModel`` filled from a T5 encoder GGUF file, its linear weights kept quantized.

    Pass it to a pipeline as a component:
    ``Pipeline.from_pretrained(repo, components={"text_encoder_2": load_gguf_text_encoder(path, config=...)})``.

    Args:
        path: the ``.gguf`` file (llama.cpp's T5 keys: ``token_embd.weight``, ``enc.blk.0.attn_q.weight``).
            A whole T5's decoder tensors (``dec.*``) are skipped.
        config: the encoder's ``T5Config``, its ``config.json`` mapping, or a local folder holding
            that file (the pipeline repository's ``text_encoder_2``). None reads the sizes from the
            file's metadata, as transformers does, with T5 v1.1's gated-GELU feed-forward (the
            T5-XXL of Flux and SD3); pass the config when the model is another T5.
        quantizer: the compute dtype (default ``GGUFQuantizer()``: bfloat16).
        device: where the weights go (default: CPU).

    Raises:
        QuantizerNotInstalledError: ``gguf`` is missing (before the file is opened).
        CheckpointError: the file is corrupt, is not a T5 encoder, a tensor's type is unknown or its
            shape does not fit the config (the message names the tensor), or tensors are missing or
            left over.
    """
    from transformers import T5Config, T5EncoderModel

    quantizer = quantizer or GGUFQuantizer()
    device = torch.device(device if device is not None else "cpu")
    quantizer.check(device)
    path = Path(path)
    metadata = _metadata(path)  # the architecture is checked before any tensor is read
    if metadata is None:
        read_gguf(path)  # a missing, truncated or corrupt file: raises, naming it
    arch = (metadata or {}).get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise CheckpointError(_MSG_NOT_T5.format(path=path, arch=arch))
    tensors = read_gguf(path)
    t5_config = _config(config, metadata, tensors, path=path, arch=str(arch))
    with torch.device("meta"):
        model = T5EncoderModel(t5_config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted = _convert(tensors, expected, path=path, gated=bool(t5_config.is_gated_act))
    # transformers' T5 casts the feed-forward's input to ``wo.weight.dtype``, which for a GGUFLinear is
    # its uint8 blocks; so ``wo`` is dequantized, as transformers keeps it unquantized (_keep_in_fp32_modules)
    skipped = (*(quantizer.modules_to_not_convert or ()), *_KEPT_FLOAT)
    assign_gguf_tensors(model, converted, quantizer.model_copy(update={"modules_to_not_convert": skipped}), device)
    if quantizer.dtype == torch.float16:
        for block in model.encoder.block:  # float16 overflows in T5's last projection (transformers keeps it in float32)
            block.layer[1].DenseReluDense.wo.float()
    model.encoder.embed_tokens = model.shared  # tied, as T5EncoderModel ties them (the file stores one)
    check_filled(model, where=path, model_name="T5EncoderModel")
    mark_quantized(model, quantizer)
    return model.eval()


def _metadata(path: Path) -> dict[str, Any] | None:
    """The file's key-value metadata (scalars and strings; arrays such as the vocabulary are left out).

    None when the file cannot be parsed; :func:`~diffblocks.components.models.gguf.read_gguf` says why.
    """
    if not path.is_file():
        return None
    try:
        reader = GGUFQuantizer().require().GGUFReader(str(path))
        return {name: field.contents() for name, field in reader.fields.items() if len(field.data) == 1}
    except (ValueError, IndexError, KeyError, OSError, struct.error, TypeError):
        return None


def _config(
    config: Any, metadata: Mapping[str, Any], tensors: Mapping[str, GGUFTensor], *, path: Path, arch: str
) -> T5Config:
    from transformers import T5Config

    if isinstance(config, T5Config):
        return config
    if isinstance(config, (str, os.PathLike)):
        return T5Config.from_pretrained(config)
    if config is not None:
        return T5Config(**{k: v for k, v in config.items() if not k.startswith("_")})
    fields = {field: metadata.get(f"{arch}.{key}") for key, field in _METADATA.items()}
    missing = [f"{arch}.{key}" for key, field in _METADATA.items() if fields[field] is None and field != "n_positions"]
    embedding = tensors.get("token_embd.weight")
    if missing or embedding is None:
        raise CheckpointError(_MSG_NO_CONFIG.format(path=path, missing=", ".join(missing) or "token_embd.weight"))
    found = {field: value for field, value in fields.items() if value is not None}
    return T5Config(vocab_size=embedding.shape[0], feed_forward_proj="gated-gelu", is_encoder_decoder=False, **found)


def _convert(
    tensors: Mapping[str, GGUFTensor], expected: Mapping[str, tuple[int, ...]], *, path: Path, gated: bool
) -> dict[str, GGUFTensor]:
    out: dict[str, GGUFTensor] = {}
    unexpected: list[str] = []
    for name, tensor in tensors.items():
        if name.startswith(_DECODER):
            continue
        key = t5_encoder_key(name, gated=gated)
        if key is None or key not in expected:
            unexpected.append(name)
            continue
        check_shape(tensor, expected[key], key, where=path, model="T5EncoderModel")
        out[key] = tensor
    missing = [k for k in expected if k not in out and k != "encoder.embed_tokens.weight"]  # tied to shared.weight
    check_placed(missing, unexpected, where=path, model="T5EncoderModel")
    return out


__all__ = ["T5_ENCODER_KEYS", "load_gguf_text_encoder", "t5_encoder_key"]
