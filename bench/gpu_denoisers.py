"""One denoiser forward, ours vs diffusers, at the real configs with random weights (GPU).

Rows: Flux.1-dev 1024² (bf16), SDXL UNet 1024² with a CFG batch of 2 (fp16), SD1.5 UNet 512² with
a CFG batch of 2 (fp16), and an SDXL-VAE decode to 1024² (fp16). Both models share the same
weight tensors (ours is built on the meta device and assigned diffusers' state dict), so outputs
are compared too. Times are CUDA-event medians after warm-up; MFU is counted FLOPs over the time,
against the 790 TFLOP/s a large bf16 matmul reaches on an H100/H200 here. ``--compile`` wraps the
timed callable (the denoiser, or the VAE's ``decode``) in ``torch.compile(dynamic=False)``.
``--channels-last`` stores both models' weights channels-last, so cuDNN's convolutions run NHWC
and skip their transposes (a row without convolutions, Flux, is unaffected). ``--cuda-graph``
captures each eager forward in one CUDA graph and times its replay: what launch overhead costs.

Run: python bench/gpu_denoisers.py [--compile [--mode reduce-overhead]] [--channels-last] [--cuda-graph] [--rows flux,sdxl,sd15,vae] [--profile]
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from typing import Any

import torch
from cuda_timing import time_ms
from torch.utils.flop_counter import FlopCounterMode

PEAK_FLOPS = 790e12


def count_flops(fn: Callable[[], Any]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def share_weights(ref: torch.nn.Module, ours_cls: Any, params: Any) -> torch.nn.Module:
    from diffblocks.components.models.buffers import materialize_computed_buffers

    with torch.device("meta"):
        ours = ours_cls(params)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    materialize_computed_buffers(ours, device=torch.device("cuda"))
    return ours.eval()


def flux_row(dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module, Callable, Callable]:
    import diffusers

    from diffblocks.components.models.flux import FLUX_DEV, FluxTransformer2DModel, prepare_image_ids, prepare_text_ids

    with torch.device("cuda"):
        ref = diffusers.FluxTransformer2DModel(guidance_embeds=True).to(dtype).eval()
    ours = share_weights(ref, FluxTransformer2DModel, FLUX_DEV)
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(1, 4096, 64, device="cuda", generator=g, dtype=dtype)
    kw = dict(
        encoder_hidden_states=torch.randn(1, 512, 4096, device="cuda", generator=g, dtype=dtype),
        pooled_projections=torch.randn(1, 768, device="cuda", generator=g, dtype=dtype),
        timestep=torch.tensor([0.6], device="cuda", dtype=dtype),
        img_ids=prepare_image_ids(64, 64, device="cuda", dtype=dtype),
        txt_ids=prepare_text_ids(512, device="cuda", dtype=dtype),
        guidance=torch.tensor([3.5], device="cuda", dtype=dtype),
    )
    return ref, ours, lambda m: m(x, **kw, return_dict=False)[0], lambda m: m(x, **kw)


SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)


# diffusers' UNet defaults are SD1.x's layout except the text width (1280 there, CLIP-L's 768 here).
SD15_UNET = dict(sample_size=64, cross_attention_dim=768)


def unet_row(dtype: torch.dtype, *, sdxl: bool) -> tuple[torch.nn.Module, torch.nn.Module, Callable, Callable]:
    import diffusers

    from diffblocks.components.models.unet import UNet2DConditionModel

    config = SDXL_UNET if sdxl else SD15_UNET
    with torch.device("cuda"):
        ref = diffusers.UNet2DConditionModel(**config).to(dtype).eval()
    ours = share_weights(ref, UNet2DConditionModel, UNet2DConditionModel.from_config(dict(ref.config)).params)
    g = torch.Generator("cuda").manual_seed(1)
    size, ctx, seq = (128, 2048, 77) if sdxl else (64, 768, 77)
    x = torch.randn(2, 4, size, size, device="cuda", generator=g, dtype=dtype)
    ehs = torch.randn(2, seq, ctx, device="cuda", generator=g, dtype=dtype)
    t = torch.tensor(500.0, device="cuda")
    added = (
        {"text_embeds": torch.randn(2, 1280, device="cuda", dtype=dtype), "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device="cuda", dtype=dtype)}
        if sdxl
        else None
    )
    return (
        ref,
        ours,
        lambda m: m(x, t, ehs, added_cond_kwargs=added, return_dict=False)[0],
        lambda m: m(x, t, ehs, added_cond_kwargs=added),
    )


def vae_row(dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module, Callable, Callable]:
    import diffusers

    from diffblocks.components.models.autoencoder_kl import AutoencoderKL

    config = dict(
        block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=1024, scaling_factor=0.13025,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    with torch.device("cuda"):
        ref = diffusers.AutoencoderKL(**config).to(dtype).eval()
    ours = share_weights(ref, AutoencoderKL, AutoencoderKL.from_config(dict(ref.config)).params)
    z = torch.randn(1, 4, 128, 128, device="cuda", dtype=dtype)
    # The timed callable is ``decode`` itself: ``torch.compile(vae)`` would compile only ``forward``.
    return ref.decode, ours.decode, lambda f: f(z, return_dict=False)[0], lambda f: f(z)


ROWS = {
    "flux": ("Flux.1-dev 1024², bf16", lambda: flux_row(torch.bfloat16)),
    "sdxl": ("SDXL UNet 1024², CFG batch 2, fp16", lambda: unet_row(torch.float16, sdxl=True)),
    "sd15": ("SD1.5 UNet 512², CFG batch 2, fp16", lambda: unet_row(torch.float16, sdxl=False)),
    "vae": ("SDXL VAE decode 1024², fp16", lambda: vae_row(torch.float16)),
}


def captured(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` recorded once into a CUDA graph (after warm-up on a side stream, as capture requires); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@torch.inference_mode()
def measure_row(
    title: str,
    build: Callable[[], tuple[Any, Any, Callable, Callable]],
    *,
    compile_mode: str | None,
    channels_last: bool,
    cuda_graph: bool,
    profile: bool,
) -> str:
    """Build one row's models, check that they agree, time both (and profile them), as a table line."""
    ref, ours, call_ref, call_ours = build()
    if channels_last:
        for model in (ref, ours):  # the VAE row times a bound ``decode``: convert the module behind it
            getattr(model, "__self__", model).to(memory_format=torch.channels_last)
    a, b = call_ref(ref), call_ours(ours)
    rel = ((a.float() - b.float()).norm() / a.float().norm()).item()
    flops = count_flops(lambda: call_ours(ours))
    if compile_mode is not None:
        ref = torch.compile(ref, dynamic=False, mode=compile_mode)
        ours = torch.compile(ours, dynamic=False, mode=compile_mode)
    runs = {"diffusers": lambda: call_ref(ref), "ours": lambda: call_ours(ours)}
    if cuda_graph:
        runs = {name: captured(fn) for name, fn in runs.items()}
    results = {}
    for name, fn in runs.items():
        torch.cuda.reset_peak_memory_stats()
        ms = time_ms(fn)
        results[name] = (ms, torch.cuda.max_memory_allocated() / 2**30)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        for name, fn in runs.items():
            with profiler(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            print(f"===== {title}: {name}")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    (ref_ms, ref_mem), (ours_ms, ours_mem) = results["diffusers"], results["ours"]
    return (
        f"| {title} | {ref_ms:.1f} | {ours_ms:.1f} | {ref_ms / ours_ms:.2f} | {flops / (ours_ms / 1e3) / PEAK_FLOPS:.1%} "
        f"| {ref_mem:.1f} | {ours_mem:.1f} | {rel:.1e} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="flux,sdxl,sd15,vae")
    parser.add_argument("--compile", action="store_true", help="torch.compile(dynamic=False) both models")
    parser.add_argument(
        "--mode", default="default", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
        help="torch.compile mode (reduce-overhead replays CUDA graphs)",
    )
    parser.add_argument("--channels-last", action="store_true", help="store both models' weights channels-last")
    parser.add_argument("--cuda-graph", action="store_true", help="time the replay of each eager forward captured in a CUDA graph")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of ours and diffusers")
    args = parser.parse_args()
    setting = (f"compiled ({args.mode})" if args.compile else "eager") + (", channels-last" if args.channels_last else "") + (
        ", CUDA graph" if args.cuda_graph else ""
    )
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {setting}", flush=True)
    lines = []
    for key in args.rows.split(","):
        gc.collect()  # the previous row's models may sit in reference cycles: peak memory must not count them
        torch.cuda.empty_cache()
        try:
            line = measure_row(
                *ROWS[key], compile_mode=args.mode if args.compile else None, channels_last=args.channels_last,
                cuda_graph=args.cuda_graph, profile=args.profile,
            )
        except Exception as error:  # one row failing (a capture, a compile) must not cost the others
            line = f"| {ROWS[key][0]} | failed: {type(error).__name__}: {str(error).splitlines()[0][:200]} |"
        lines.append(line)
        print(line, flush=True)
    print("\n| row | diffusers ms | ours ms | speed-up | ours MFU | diffusers peak GiB | ours peak GiB | rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
