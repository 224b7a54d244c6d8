"""Memory and CPU speed of each quantized path against float, on a tiny random Flux transformer.

One transformer (hidden width 256, so every GGUF K-quant fits its rows) is saved once; each path
loads it (or a GGUF file written from it) into our ``FluxTransformer2DModel`` and, where diffusers
has the same backend on the CPU, into diffusers' ``FluxTransformer2DModel``. The two forwards of a
path are timed alternately in one process (median of ``--repeats`` after a warm-up), so load on a
shared machine hits both alike. Memory is what the weights hold (``component_memory``), against
the float model. Torch runs on one thread (see ``sd_pipeline_cpu.py`` for why).
Run from the repository root: python bench/quantization_cpu.py [--repeats 20] [--tokens 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests build the GGUF files

from diffblocks.components.models.flux import FluxTransformer2DModel  # noqa: E402
from diffblocks.components.quantizers import (  # noqa: E402
    AbstractQuantizer,
    BitsAndBytesQuantizer,
    GGUFQuantizer,
    QuantoQuantizer,
    TorchAoQuantizer,
)
from diffblocks.components.models.gguf import load_gguf  # noqa: E402
from diffblocks.components.quantizers.memory import component_memory  # noqa: E402
from tests.quantizers.gguf_files import stored, write_gguf  # noqa: E402

CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=2,
    joint_attention_dim=256, pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)


def inputs(tokens: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, tokens, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, 32, 256, generator=g),
        "pooled_projections": torch.randn(1, 256, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(tokens, 3),
        "txt_ids": torch.zeros(32, 3),
    }


def diffusers_config(quantizer: AbstractQuantizer) -> Any:
    from diffusers import QuantoConfig, TorchAoConfig

    if isinstance(quantizer, TorchAoQuantizer):
        return TorchAoConfig(quantizer.torchao_config())
    if isinstance(quantizer, QuantoQuantizer):
        return QuantoConfig(weights_dtype=quantizer.weights)
    return None  # bitsandbytes: diffusers refuses it without a GPU


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import diffusers

    x = inputs(args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "float"
        torch.manual_seed(0)
        reference = diffusers.FluxTransformer2DModel(**CONFIG).eval()
        reference.save_pretrained(folder)
        floats = FluxTransformer2DModel.from_pretrained(folder)
        float_bytes = component_memory("float", floats).bytes

        def ours_call(model: Any) -> Callable[[], Any]:
            return lambda: model(**x)

        def theirs_call(model: Any) -> Callable[[], Any]:
            return lambda: model(**x, return_dict=False)

        paths: list[tuple[str, Any, Any]] = [("float32", floats, reference)]
        for quantizer in (
            TorchAoQuantizer("int8wo"), TorchAoQuantizer("int8dq"), TorchAoQuantizer("float8wo"),
            QuantoQuantizer("int8"), QuantoQuantizer("int4"), BitsAndBytesQuantizer("nf4"), BitsAndBytesQuantizer("int8"),
        ):
            config = diffusers_config(quantizer)
            theirs = None
            if config is not None:
                theirs = diffusers.FluxTransformer2DModel.from_pretrained(folder, quantization_config=config, torch_dtype=torch.float32).eval()
            paths.append((quantizer.describe(), FluxTransformer2DModel.from_pretrained(folder, quantizer=quantizer), theirs))
        for kind in ("Q8_0", "Q4_0", "Q4_K", "Q6_K"):
            path = write_gguf(Path(tmp) / f"{kind}.gguf", stored(reference.state_dict(), kind))
            ours = load_gguf(path, FluxTransformer2DModel, config=reference.config, quantizer=GGUFQuantizer("float32"))
            theirs = diffusers.FluxTransformer2DModel.from_single_file(
                str(path), config=str(folder), quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32),
                torch_dtype=torch.float32,
            )
            paths.append((f"GGUF {kind} (float32 compute)", ours, theirs))

        print(f"| path | weights MiB | / float | ours ms | diffusers ms | ours / diffusers |")
        print("|---|---|---|---|---|---|")
        for name, ours, theirs in paths:
                # quanto's int4 layers cannot run under inference_mode (a pipeline picks no_grad for them too)
                with torch.no_grad() if "int4" in name else torch.inference_mode():
                    ours_fn = ours_call(ours)
                    ours_fn()
                    theirs_fn = theirs_call(theirs) if theirs is not None else None
                    if theirs_fn is not None:
                        theirs_fn()
                    ours_times, theirs_times = [], []
                    for _ in range(args.repeats):  # alternate, so load on the machine hits both alike
                        ours_times.append(median_ms(ours_fn, 1))
                        if theirs_fn is not None:
                            theirs_times.append(median_ms(theirs_fn, 1))
                size = component_memory(name, ours).bytes
                ours_ms = statistics.median(ours_times)
                theirs_ms = statistics.median(theirs_times) if theirs_times else None
                ratio = f"{ours_ms / theirs_ms:.2f}" if theirs_ms else "-"
                theirs_text = f"{theirs_ms:.1f}" if theirs_ms else "-"
                print(f"| {name} | {size / 2**20:.2f} | {size / float_bytes:.2f} | {ours_ms:.1f} | {theirs_text} | {ratio} |")


if __name__ == "__main__":
    main()
