"""Flux.1-dev through each quantized path on the GPU, ours against diffusers (random weights, real config).

torchao rows (``--paths``): diffusers' ``FluxTransformer2DModel`` at the real Flux.1-dev config with
random bf16 weights, and ours assigned the same tensors; each quantized path quantizes a copy of
diffusers' model with torchao's ``quantize_`` over its linear layers (what diffusers' ``TorchAoConfig``
does when loading) and ours through ``quantize(model, TorchAoQuantizer(...))``. One forward at 1024²
(4096 image + 512 text tokens), eager and ``torch.compile(dynamic=False)``, CUDA-event medians.

GGUF rows (``--gguf``): a transformer of the real width but ``--gguf-depth`` double/single blocks
(a full-depth GGUF file would take minutes to write), saved as GGUF blocks (Q8_0 by the ``gguf``
package, K-quants as random valid blocks) and loaded by ours (``load_gguf``) and by diffusers
(``from_single_file`` with ``GGUFQuantizationConfig``); both dequantize each layer at compute time.

"weights GiB" is what our model holds (``component_memory``). "rel. diff" is the relative L2
difference between our output and diffusers' on the same path.
Run: python bench/quantization_gpu.py [--paths bf16,float8dq,int8wo,int8dq] [--gguf Q8_0,Q4_K] [--no-compile]
CPU smoke test of the script itself: python bench/quantization_gpu.py --tiny
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # tests.quantizers.gguf_files writes the GGUF files

from flux_bench import FLUX_DEV_CONFIG, TINY_CONFIG, Recorder, build_reference, inputs, ours_sharing, rel_diff, timer  # noqa: E402


def measure(
    record: Recorder, path: str, ours: torch.nn.Module, ref: torch.nn.Module, x: dict[str, torch.Tensor], *,
    device: torch.device, compile_too: bool, repeat: int, extra: dict[str, Any], ours_only: bool = False,
) -> None:
    from diffblocks.components.quantizers.memory import component_memory

    time_ms = timer(device)
    with torch.inference_mode():
        diff = rel_diff(ours(**x), ref(**x, return_dict=False)[0])
        weights = component_memory(path, ours).bytes / 2**30
        modes = [("eager", ours, ref)]
        if compile_too:
            ref_compiled = ref if ours_only else torch.compile(ref, dynamic=False)
            modes.append(("compiled" if not ours_only else "compiled (diffusers eager)", torch.compile(ours, dynamic=False), ref_compiled))
        for mode, o, r in modes:
            started = time.perf_counter()
            o(**x), r(**x, return_dict=False)  # compile both outside the timed calls
            warm_s = time.perf_counter() - started
            ours_ms, ref_ms = time_ms(lambda: o(**x), repeat), time_ms(lambda: r(**x, return_dict=False), repeat)
            ours_again = time_ms(lambda: o(**x), repeat)  # a second sample of ours: the spread of this machine
            record.add(
                path=path, mode=mode, ours_ms=round(ours_ms, 2), ours_again_ms=round(ours_again, 2),
                diffusers_ms=round(ref_ms, 2), ratio=round(ours_ms / ref_ms, 3), weights_gib=round(weights, 2),
                rel_diff=float(f"{diff:.2e}"), warmup_s=round(warm_s, 1), **extra,
            )
    torch._dynamo.reset()


def torchao_rows(record: Recorder, args: argparse.Namespace, device: torch.device, config: dict[str, Any]) -> None:
    from torchao.quantization import quantize_

    from diffblocks.components.quantizers import TorchAoQuantizer
    from diffblocks.components.quantizers.base import quantize

    dtype = torch.bfloat16
    torch.manual_seed(0)
    ref = build_reference(config, device, dtype)
    x = inputs(config, device, dtype, tiny=args.tiny)
    for path in args.paths:
        if path == "bf16":
            measure(record, "bf16", ours_sharing(ref, device), ref, x, device=device, compile_too=args.compile, repeat=args.repeat, extra={})
            continue
        quantizer = TorchAoQuantizer(path)
        theirs = copy.deepcopy(ref)
        ours = ours_sharing(theirs, device)
        # what diffusers' TorchAoConfig does when loading: torchao's quantize_ over every linear layer
        quantize_(theirs, quantizer.torchao_config(), filter_fn=lambda m, _: isinstance(m, torch.nn.Linear))
        quantize(ours, quantizer)
        measure(record, path, ours, theirs, x, device=device, compile_too=args.compile, repeat=args.repeat, extra={},
                ours_only=args.compile_ours_only)
        del ours, theirs
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None


def gguf_rows(record: Recorder, args: argparse.Namespace, device: torch.device, config: dict[str, Any]) -> None:
    import diffusers

    from diffblocks.components.models.flux import FluxTransformer2DModel
    from diffblocks.components.models.gguf import load_gguf
    from diffblocks.components.quantizers import GGUFQuantizer
    from tests.quantizers.gguf_files import stored, write_gguf

    dtype = torch.bfloat16
    double, single = args.gguf_depth
    small = dict(config, num_layers=double, num_single_layers=single)
    torch.manual_seed(0)
    ref = build_reference(small, device, dtype)
    x = inputs(small, device, dtype, tiny=args.tiny)
    extra = {"depth": f"{double} double + {single} single"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "config"
        ref.save_config(folder)
        measure(record, "bf16 (same depth)", ours_sharing(ref, device), ref, x, device=device, compile_too=args.gguf_compile, repeat=args.repeat, extra=extra)
        state = {k: v.float().cpu() for k, v in ref.state_dict().items()}
        del ref
        for kind in args.gguf:
            started = time.perf_counter()
            file = write_gguf(Path(tmp) / f"{kind}.gguf", stored(state, kind))
            written_s = time.perf_counter() - started
            ours = load_gguf(file, FluxTransformer2DModel, config=small, quantizer=GGUFQuantizer("bfloat16"), device=device)
            theirs = diffusers.FluxTransformer2DModel.from_single_file(
                str(file), config=str(folder), torch_dtype=dtype,
                quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=dtype),
            ).to(device).eval()
            measure(record, f"GGUF {kind}", ours, theirs, x, device=device, compile_too=args.gguf_compile, repeat=args.repeat,
                    extra=dict(extra, file_written_s=round(written_s, 1)))
            del ours, theirs
            file.unlink()
            gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--paths", default="bf16,float8dq,int8wo,int8dq", type=lambda s: [p for p in s.split(",") if p])
    parser.add_argument("--gguf", default="Q8_0,Q4_K", type=lambda s: [p for p in s.split(",") if p])
    parser.add_argument("--gguf-depth", default="2,4", type=lambda s: tuple(int(n) for n in s.split(",")))
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--compile-ours-only", action="store_true", help="quantized rows: compile ours alone (saves minutes)")
    parser.add_argument("--gguf-compile", action="store_true", help="time the GGUF rows compiled too")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="a tiny config on the CPU: checks the script, measures nothing")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    device = torch.device("cpu" if args.tiny else "cuda")
    config = TINY_CONFIG if args.tiny else FLUX_DEV_CONFIG
    if args.tiny:
        args.paths = [p for p in args.paths if p in ("bf16", "int8wo", "int8dq")]
        args.gguf_depth, args.repeat = (1, 1), 2
    else:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    torch._dynamo.config.cache_size_limit = 64
    record = Recorder("quantization_gpu")
    if args.paths:
        torchao_rows(record, args, device, config)
    if args.gguf:
        gguf_rows(record, args, device, config)
    print("| path | mode | ours ms | (again) | diffusers ms | ours / diffusers | weights GiB | rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in record.rows:
        print(f"| {r['path']} | {r['mode']} | {r['ours_ms']} | {r['ours_again_ms']} | {r['diffusers_ms']} | {r['ratio']} | {r['weights_gib']} | {r['rel_diff']} |")


if __name__ == "__main__":
    main()
