"""Whole pipeline calls under a GPU memory cap: ours under a memory budget vs unconstrained, and vs diffusers' offloading.

Flux.1-dev (bf16, 1024², the real transformer, T5-XXL, CLIP-L and VAE configs) and SDXL (fp16,
1024², CFG) with random weights: each model is built once, and ours and diffusers' pipelines use
the same weight tensors (ours are built on the meta device and assigned diffusers' state dicts).

A cap is real: ``torch.cuda.set_per_process_memory_fraction`` makes the caching allocator refuse
more, for ours and diffusers alike. Our rows give the manager ``memory_budget=cap``; the planner
reserves its own estimate of a step's activations at the call's size (``--reserve 3GiB`` fixes the
reserve instead), picks the policy and keeps what blocks it can in the rest. Rows, per model:

- ``ours``: every model on the GPU (no budget).
- ``ours@12GiB`` / ``ours@8GiB`` (Flux), ``ours@6GiB`` (SDXL): under the cap, the planner's choice.
- ``ours-group`` (asked for by name only): ``offload=GroupOffload(1)`` with no cap and no budget,
  every repeated block streamed; it tells what streaming itself costs and changes from what a cap does.
- ``diffusers``: every model on the GPU.
- ``diffusers-model-offload``: ``enable_model_cpu_offload()``, no cap (the transformer alone is 22 GiB).
- ``diffusers-group-offload@12GiB`` (Flux), ``@6GiB`` (SDXL): ``enable_group_offload(block_level,
  num_blocks_per_group=1, use_stream=True, record_stream=True)`` under the cap.

Each row is called once with 2 steps (warm-up: kernels chosen, group order learned), then timed
over ``--steps`` steps (the median of ``--repeat`` calls, wall clock around a synchronized call).
Reported: seconds per call, the ratio to ``ours``, peak allocated and reserved GPU memory, the
policy chosen, and the largest difference of the image (0-255) from ``ours``; the JSON adds the
seconds the row's setup took (``setup_s``: diffusers' ``enable_*`` pins its offloaded
weights there; ours pins when a call first hands each model out) and the first (2-step) call's, the
allocator's retries and refused requests over the timed calls and any ``OffloadTightened`` warning. JSON goes to
``$OUT/memory_gpu.json`` when ``OUT`` is set.

``--tiny`` runs tiny configs on the CPU (the capped rows with ``offload=GroupOffload(1)``, diffusers'
offloading skipped: it needs an accelerator): a check that the script runs, not a measurement.

Run: python bench/memory_gpu.py [--rows flux,sdxl | flux/ours,flux/ours@12GiB,...] [--steps 28] [--repeat 1] [--tiny]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' tokenizer fixtures

from diffblocks.blocks import Pipeline  # noqa: E402
from diffblocks.components import ComponentsManager  # noqa: E402
from diffblocks.components.memory import ByteSize, GroupOffload, OffloadTightened  # noqa: E402
from tests.conftest import CLIP_TOKENIZER_DIR, T5_TOKENIZER_DIR  # noqa: E402

GIB = 2**30
FLUX_SCHEDULER = {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}
SDXL_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
    "timestep_spacing": "leading", "num_train_timesteps": 1000,
}


@dataclass
class Models:
    """One family's weights, as diffusers' pipeline and ours use them."""

    family: str
    dtype: torch.dtype
    size: int
    reserve: int | None  # bytes left for activations under a cap (None: the planner's estimate of the call's step)
    diffusers_components: dict[str, Any]
    ours_components: dict[str, Any]
    blocks: Any


def _built(make: Callable[[], torch.nn.Module], dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A model with random weights, initialised on ``device`` (fast on a GPU) in ``dtype``, then kept on the CPU."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = make()
    finally:
        torch.set_default_dtype(previous)
    return model.to("cpu", dtype).eval()


def _ours(ref: torch.nn.Module, cls: Any, params: Any) -> torch.nn.Module:
    """Our model for ``ref``'s config, holding ``ref``'s tensors (assigned, not copied)."""
    from diffblocks.components.models.buffers import materialize_computed_buffers

    with torch.device("meta"):
        ours = cls(params)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    materialize_computed_buffers(ours, device=torch.device("cpu"))
    return ours.eval()


def _params(cls: Any, ref: torch.nn.Module) -> Any:
    with torch.device("meta"):
        return cls.from_config(dict(ref.config)).params


def flux_models(*, tiny: bool, device: str) -> Models:
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    from diffblocks.components.models.autoencoder_kl import AutoencoderKL
    from diffblocks.components.models.flux import FLUX_DEV, FluxParams, FluxTransformer2DModel
    from diffblocks.components.schedulers import FlowMatchEulerDiscreteScheduler
    from diffblocks.presets.flux import default_guider, flux_blocks

    dtype = torch.bfloat16
    torch.manual_seed(0)
    if tiny:
        transformer_config = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        vae_config = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=32)
        clip = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              projection_dim=32)
        t5 = T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
    else:
        transformer_config = dict(guidance_embeds=True)  # diffusers' defaults are Flux.1's transformer
        vae_config = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024)
        clip = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
        t5 = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    transformer = _built(lambda: diffusers.FluxTransformer2DModel(**transformer_config), dtype, device)
    vae = _built(lambda: diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, **vae_config,
    ), dtype, device)
    text_encoder = _built(lambda: CLIPTextModel(clip), dtype, device)
    text_encoder_2 = _built(lambda: T5EncoderModel(t5), dtype, device)
    tokenizer, tokenizer_2 = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR), T5TokenizerFast.from_pretrained(T5_TOKENIZER_DIR)
    shared = dict(text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2)
    params = FLUX_DEV if not tiny else FluxParams(**{k: v for k, v in transformer_config.items() if k != "axes_dims_rope"},
                                                  axes_dims_rope=(4, 6, 6))
    return Models(
        "flux", dtype, 64 if tiny else 1024, None,
        dict(transformer=transformer, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), **shared),
        dict(transformer=_ours(transformer, FluxTransformer2DModel, params), vae=_ours(vae, AutoencoderKL, _params(AutoencoderKL, vae)),
             scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER), guider=default_guider(), **shared),
        flux_blocks(),
    )


def sdxl_models(*, tiny: bool, device: str) -> Models:
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from diffblocks.components.models.autoencoder_kl import AutoencoderKL
    from diffblocks.components.models.unet import UNet2DConditionModel
    from diffblocks.components.schedulers import EulerDiscreteScheduler
    from diffblocks.presets.sdxl import default_guider, sdxl_blocks

    dtype = torch.float16
    torch.manual_seed(0)
    if tiny:
        first = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
        second = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                projection_dim=32)
        unet_config = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, transformer_layers_per_block=(1, 2),
                           attention_head_dim=(2, 4), cross_attention_dim=64, norm_num_groups=8,
                           projection_class_embeddings_input_dim=6 * 8 + 32, addition_time_embed_dim=8,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        vae_config = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=64,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    else:
        first = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               hidden_act="quick_gelu", projection_dim=768)
        second = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                                hidden_act="gelu", projection_dim=1280)
        unet_config = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                           attention_head_dim=(5, 10, 20), cross_attention_dim=2048, projection_class_embeddings_input_dim=2816,
                           addition_time_embed_dim=256,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
        vae_config = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024,
                          down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    unet = _built(lambda: diffusers.UNet2DConditionModel(use_linear_projection=True, addition_embed_type="text_time", **unet_config),
                  dtype, device)
    vae = _built(lambda: diffusers.AutoencoderKL(latent_channels=4, scaling_factor=0.13025, **vae_config), dtype, device)
    text_encoder = _built(lambda: CLIPTextModel(first), dtype, device)
    text_encoder_2 = _built(lambda: CLIPTextModelWithProjection(second), dtype, device)
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)
    shared = dict(text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer)
    return Models(
        "sdxl", dtype, 64 if tiny else 1024, None,
        dict(unet=unet, vae=vae, scheduler=diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER), **shared),
        dict(unet=_ours(unet, UNet2DConditionModel, _params(UNet2DConditionModel, unet)), vae=_ours(vae, AutoencoderKL, _params(AutoencoderKL, vae)),
             scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), guider=default_guider(), **shared),
        sdxl_blocks(),
    )


FAMILIES = {"flux": (flux_models, ("ours", "ours@12GiB", "ours@8GiB", "diffusers", "diffusers-model-offload",
                                   "diffusers-group-offload@12GiB")),
            "sdxl": (sdxl_models, ("ours", "ours@6GiB", "diffusers", "diffusers-model-offload", "diffusers-group-offload@6GiB"))}
BY_NAME_ONLY = ("ours-group",)  # rows run only when named: after ``ours``, before the others


def _inputs(models: Models, steps: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(prompt="a photo of a red fox in the snow", height=models.size, width=models.size,
                                  num_inference_steps=steps, output_type="np")
    if models.family == "flux":
        kwargs["guidance_scale"] = 3.5
    else:
        kwargs.update(negative_prompt="blurry", guidance_scale=5.0)
    return kwargs


def _cap(row: str) -> int | None:
    return int(ByteSize.parse(row.split("@", 1)[1])) if "@" in row else None


def _ours_pipe(models: Models, row: str, device: str) -> tuple[Pipeline, Callable[[], None], str]:
    cap = _cap(row)
    if row == "ours-group":
        manager = ComponentsManager(device=device, offload=GroupOffload(1))
    elif cap is None:
        manager = ComponentsManager(device=device)
    elif device == "cuda":
        reserve = {} if models.reserve is None else {"activations": models.reserve}  # None: the planner's own step estimate
        manager = ComponentsManager(device=device, memory_budget=cap, **reserve)
    else:  # tiny, on the CPU: the tiny models are mostly embeddings, so the planner would not stream; the streaming path runs anyway
        manager = ComponentsManager(device=device, offload=GroupOffload(1))
    pipe = Pipeline(models.blocks, models.ours_components, manager=manager, name=f"{models.family}:{row}")
    if row == "ours-group":
        policy = "GroupOffload(1), no cap"
    elif cap is None:
        manager.to(device)
        policy = "every model on the device"
    else:
        policy = _described(manager.plan())

    def undo() -> None:
        manager.placement.detach_all()
        for value in models.ours_components.values():
            if isinstance(value, torch.nn.Module):
                value.to("cpu")

    pipe.manager_for_report = manager if cap is not None else None  # type: ignore[attr-defined]
    return pipe, undo, policy


class _Phases:
    """The last call's denoise loop (first denoiser forward to the decode) and VAE decode, in seconds.

    The device is synchronized at those edges only (and after each tile of a tiled decode): a
    synchronization inside the loop would stall the copies that run ahead into the next step.
    """

    def __init__(self, models: Models, row: str) -> None:
        components = models.ours_components if row.startswith("ours") else models.diffusers_components
        denoiser = components["transformer" if models.family == "flux" else "unet"]
        decoder = components["vae"].decoder
        self.marks: dict[str, float] = {}
        self.denoising = False
        self.handles = [denoiser.register_forward_pre_hook(self._denoise),
                        decoder.register_forward_pre_hook(self._decode),
                        decoder.register_forward_hook(lambda *_: self._mark("decode_end"))]  # a tiled decode: its last tile's end

    def _denoise(self, *_: Any) -> None:
        if not self.denoising:
            self.denoising = True
            self._mark("denoise_start")

    def _decode(self, *_: Any) -> None:
        if self.denoising:  # the first tile of a tiled decode: the loop has ended
            self.denoising = False
            self._mark("decode_start")

    def _mark(self, name: str) -> None:
        torch.cuda.synchronize()
        self.marks[name] = time.perf_counter()

    def last(self) -> dict[str, float]:
        m = self.marks
        return {"denoise_s": m["decode_start"] - m["denoise_start"], "decode_s": m["decode_end"] - m["decode_start"]}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _described(plan: Any) -> str:
    kept = f", up to {ByteSize(sum(plan.kept.values()))} of blocks kept" if plan.kept else ""
    return f"{plan.policy!r}{kept}, {plan.activations} reserved"


def _diffusers_pipe(models: Models, row: str, device: str) -> tuple[Any, Callable[[], None], str]:
    import diffusers

    cls = diffusers.FluxPipeline if models.family == "flux" else diffusers.StableDiffusionXLPipeline
    extra = {} if models.family == "flux" else {"add_watermarker": False}
    pipe = cls(**models.diffusers_components, **extra)
    pipe.set_progress_bar_config(disable=True)
    if row == "diffusers":
        pipe.to(device)
        policy = "every model on the device"
    elif row == "diffusers-model-offload":
        pipe.enable_model_cpu_offload(device=device)
        policy = "enable_model_cpu_offload()"
    else:
        pipe.enable_group_offload(onload_device=torch.device(device), offload_type="block_level", num_blocks_per_group=1,
                                  use_stream=True, record_stream=True)
        policy = "enable_group_offload(block_level, 1 block, use_stream, record_stream)"

    def undo() -> None:
        pipe.remove_all_hooks()
        for value in models.diffusers_components.values():
            if isinstance(value, torch.nn.Module):
                value.to("cpu")

    return pipe, undo, policy


def run_row(models: Models, row: str, *, device: str, steps: int, repeat: int) -> dict[str, Any]:
    cuda = device == "cuda"
    cap = _cap(row)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total) if cap is not None else 1.0)
    result: dict[str, Any] = {"family": models.family, "row": row, "steps": steps, "cap_gib": cap / GIB if cap else None}
    undo: Callable[[], None] = lambda: None  # noqa: E731
    try:
        start = time.perf_counter()  # setup: diffusers pins its offloaded weights here, ours when a call first hands a model out
        if row.startswith("ours"):
            pipe, undo, policy = _ours_pipe(models, row, device)
            call = lambda n: pipe(**_inputs(models, n), generator=torch.Generator().manual_seed(0), progress=False).images  # noqa: E731
        else:
            pipe, undo, policy = _diffusers_pipe(models, row, device)
            call = lambda n: pipe(**_inputs(models, n), generator=torch.Generator().manual_seed(0)).images  # noqa: E731
        if cuda:
            torch.cuda.synchronize()
        result["setup_s"] = time.perf_counter() - start
        result["policy"] = policy
        phases = _Phases(models, row) if cuda else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", OffloadTightened)
            start = time.perf_counter()
            call(2)  # warm-up: the first call also pins the offloaded weights and learns the order of the groups
            if cuda:
                torch.cuda.synchronize()
            result["first_call_s"] = time.perf_counter() - start
            before = _allocator_counts() if cuda else {}
            times = []
            for _ in range(repeat):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                images = call(steps)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        result["tightened"] = [str(w.message) for w in caught if issubclass(w.category, OffloadTightened)]
        result["seconds"] = statistics.median(times)
        if phases is not None:
            result.update(phases.last())
            phases.remove()
        result["image"] = np.asarray(images[0], dtype=np.float32)
        if cuda:
            result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
            # Counted over the timed calls only. The caching allocator counts every refused request as an
            # out-of-memory error, also those caught inside torch (cuDNN tries each convolution
            # algorithm's workspace and falls back to one that fits); the steps' own retries say
            # so in an OffloadTightened warning ("tightened" above, warm-up included).
            after = _allocator_counts()
            result["allocator_timed"] = {key: after[key] - before[key] for key in after}
        manager = getattr(pipe, "manager_for_report", None)
        if manager is not None:  # the plan after the calls: the planner may have re-planned for the step's activations
            plan = manager.plan()
            result["plan"] = str(plan)
            result["policy"] = _described(plan)
    except torch.OutOfMemoryError as error:
        result["error"] = f"out of memory: {str(error).splitlines()[0]}"
    except Exception as error:  # noqa: BLE001 - a failing row is reported, the others still run
        result["error"] = f"{type(error).__name__}: {error}"
    finally:
        undo()
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
    return result


def _allocator_counts() -> dict[str, int]:
    stats = torch.cuda.memory_stats()
    return {key: int(stats.get(key, 0)) for key in ("num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="flux,sdxl", help="families (flux, sdxl) or rows (flux/ours@12GiB), comma-separated")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--reserve", default="planner",
                        help="activations reserved under a cap: 'planner' (its estimate of the call's step) or a size ('3GiB')")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU: a check that the script runs")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny for the CPU check")
    wanted: dict[str, list[str]] = {}
    for item in args.rows.split(","):
        family, _, row = item.strip().partition("/")
        if family not in FAMILIES or (row and row not in FAMILIES[family][1] + BY_NAME_ONLY):
            parser.error(f"unknown row {item!r}: families {sorted(FAMILIES)}, rows {[f'{f}/{r}' for f, (_, rs) in FAMILIES.items() for r in rs]}")
        wanted.setdefault(family, []).extend([row] if row else FAMILIES[family][1])
    import diffusers

    setting = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
               "diffusers": diffusers.__version__, "steps": args.steps, "repeat": args.repeat, "tiny": args.tiny,
               "reserve": args.reserve, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    print(" ".join(f"{k}={v}" for k, v in setting.items()))
    results = []
    for family, rows in wanted.items():
        build, order = FAMILIES[family]
        start = time.perf_counter()
        models = build(tiny=args.tiny, device="cuda" if device == "cuda" else "cpu")
        models.reserve = None if args.reserve == "planner" else int(ByteSize.parse(args.reserve))
        print(f"{family}: models built in {time.perf_counter() - start:.0f} s")
        base: dict[str, Any] | None = None
        order = order[:1] + BY_NAME_ONLY + order[1:]
        for row in [r for r in order if r in rows]:
            if row.startswith("diffusers-") and device != "cuda":
                results.append({"family": family, "row": row, "error": "skipped: diffusers' offloading needs an accelerator"})
                continue
            result = run_row(models, row, device=device, steps=args.steps, repeat=args.repeat)
            if row == "ours" and "image" in result:
                base = result
            if base is not None and "image" in result:
                result["vs_ours"] = result["seconds"] / base["seconds"]
                result["max_abs_diff_vs_ours"] = float(np.abs(result["image"] - base["image"]).max() * (255 if result["image"].max() <= 1 else 1))
            results.append(result)
            _save(setting, results)  # after every row: a run cut short keeps what it measured
            print(_line(result), flush=True)
            if "first_call_s" in result:
                print(f"  setup {result['setup_s']:.2f} s, first (2-step) call {result['first_call_s']:.2f} s", flush=True)
            for message in result.get("tightened", []):
                print(f"  tightened during the row: {message}", flush=True)
        del models
        gc.collect()
    print()
    print("| model | row | policy | s/call (denoise + decode) | vs ours | peak alloc GiB | peak reserved GiB | max diff vs ours (0-255) |")
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        print(_line(result))


def _save(setting: dict[str, Any], results: list[dict[str, Any]]) -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        clean = [{k: v for k, v in r.items() if k != "image"} for r in results]
        (Path(out) / "memory_gpu.json").write_text(json.dumps({"setting": setting, "rows": clean}, indent=2))


def _line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {r['family']} | {r['row']} | {r.get('policy', '')} | {r['error'][:160]} | | | | |"
    fmt = lambda key, spec: format(r[key], spec) if r.get(key) is not None else "-"  # noqa: E731
    return (f"| {r['family']} | {r['row']} | {r['policy']} | {r['seconds']:.2f} ({fmt('denoise_s', '.2f')} + {fmt('decode_s', '.2f')}) "
            f"| {fmt('vs_ours', '.2f')} "
            f"| {fmt('peak_allocated_gib', '.2f')} | {fmt('peak_reserved_gib', '.2f')} | {fmt('max_abs_diff_vs_ours', '.1f')} |")


if __name__ == "__main__":
    main()
