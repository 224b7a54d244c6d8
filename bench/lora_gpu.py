"""Per-step cost of LoRA on the Flux.1-dev transformer on the GPU: unfused (one and two adapters), fused; ours and diffusers.

diffusers' ``FluxTransformer2DModel`` at the real config with random bf16 weights, and ours holding the
same tensors. Two random rank-``--rank`` LoRAs in diffusers' PEFT file layout update every attention
projection, ``proj_mlp`` and ``proj_out`` (the targets of common Flux LoRAs); diffusers loads them with
``load_lora_adapter`` (PEFT layers) and ours with ``LoRA.from_file``. One forward at 1024² (4096 image +
512 text tokens), CUDA-event medians; each pair's outputs are compared. Fusing comes last: it changes
the weights the two models share.
Run: python bench/lora_gpu.py [--rank 16] [--no-compile]     CPU smoke test: python bench/lora_gpu.py --tiny
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from flux_bench import FLUX_DEV_CONFIG, TINY_CONFIG, Recorder, build_reference, inputs, ours_sharing, rel_diff, timer  # noqa: E402

TARGETS = {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp", "proj_out"}


def random_lora(model: torch.nn.Module, path: Path, *, rank: int, seed: int) -> Path:
    """A random LoRA for ``model``'s target layers in diffusers' PEFT layout (``transformer.<layer>.lora_A.weight``)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in TARGETS):
            # PEFT's default init scale for A; B small but non-zero so the update is visible
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) / module.in_features**0.5
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 1e-2
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--tiny", action="store_true", help="a tiny config on the CPU: checks the script, measures nothing")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import diffusers

    from diffblocks.components.lora import LoRA, fuse, inject, set_weights

    device = torch.device("cpu" if args.tiny else "cuda")
    config = TINY_CONFIG if args.tiny else FLUX_DEV_CONFIG
    repeat = 2 if args.tiny else args.repeat
    if not args.tiny:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, diffusers {diffusers.__version__}", flush=True)
    time_ms = timer(device)
    record = Recorder("lora_gpu")
    torch.manual_seed(0)
    ref = build_reference(config, device, torch.bfloat16)
    ours = ours_sharing(ref, device)
    x = inputs(config, device, torch.bfloat16, tiny=args.tiny)
    tmp = Path(tempfile.mkdtemp())
    files = [random_lora(ref, tmp / f"{seed}.safetensors", rank=args.rank, seed=seed) for seed in (1, 2)]

    base: list[torch.Tensor] = []

    def row(name: str, o: torch.nn.Module, r: torch.nn.Module | None) -> None:
        with torch.inference_mode():
            ours_out = o(**x)
            base.append(ours_out) if not base else None
            diff = rel_diff(ours_out, r(**x, return_dict=False)[0]) if r is not None else None
            ours_ms = time_ms(lambda: o(**x), repeat)
            ref_ms = time_ms(lambda: r(**x, return_dict=False), repeat) if r is not None else None
            again = time_ms(lambda: o(**x), repeat)
        record.add(
            workload=name, rank=args.rank, ours_ms=round(ours_ms, 2), ours_again_ms=round(again, 2),
            diffusers_ms=None if ref_ms is None else round(ref_ms, 2),
            ratio=None if ref_ms is None else round(ours_ms / ref_ms, 3),
            rel_diff=None if diff is None else float(f"{diff:.2e}"),
            change_vs_no_lora=float(f"{rel_diff(ours_out, base[0]):.2e}"),  # the adapters do act
        )

    row("no LoRA", ours, ref)
    ref.load_lora_adapter(str(files[0]), prefix="transformer", adapter_name="a")
    inject(ours, LoRA.from_file(files[0], ours, name="a"))
    row("one adapter, unfused", ours, ref)
    ref.load_lora_adapter(str(files[1]), prefix="transformer", adapter_name="b")
    ref.set_adapters(["a", "b"], [0.7, 0.4])
    inject(ours, LoRA.from_file(files[1], ours, name="b"))
    set_weights(ours, {"a": 0.7, "b": 0.4})
    row("two adapters (0.7, 0.4), unfused", ours, ref)
    if args.compile:
        row("two adapters, unfused, compiled", torch.compile(ours, dynamic=False), torch.compile(ref, dynamic=False))
        torch._dynamo.reset()
    fuse(ours)  # changes the base weights ref shares: ref is not timed after this
    row("two adapters, fused", ours, None)
    print("| workload | ours ms | (again) | diffusers ms | ours / diffusers | rel. diff |")
    print("|---|---|---|---|---|---|")
    for r in record.rows:
        print(f"| {r['workload']} | {r['ours_ms']} | {r['ours_again_ms']} | {r['diffusers_ms']} | {r['ratio']} | {r['rel_diff']} |")


if __name__ == "__main__":
    main()
