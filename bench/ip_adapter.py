"""Per-step cost of IP-Adapter: one UNet forward with and without it, ours vs diffusers.

SD1.5 and SDXL UNets at their real configs with random weights take a classifier-free guidance
batch of 2 (512² and 1024² in fp16 on a GPU; ``--device cpu`` runs float32 at ``--latent`` size,
one thread, timed with perf_counter medians); both libraries share the same weight tensors. Random
IP-Adapters of the released shapes (plain: 4 tokens from a 1024-wide (SD1.5) or 1280-wide (SDXL)
image embedding; plus: a 4-layer resampler of 16 tokens over 257 ViT-H hidden states) are loaded
into diffusers' UNet (``_load_ip_adapter_weights``, what ``load_ip_adapter`` calls) and into ours
(``load_ip_adapter_file``). Per step, diffusers runs the image projection inside the UNet; ours
runs it once per call (``EncodeImagePrompt``), so the timed step gets the projected tokens. The
outputs of each pair are compared.

Run: python bench/ip_adapter.py [--rows sd15,sdxl] [--kinds plain,plus] [--repeat 20] [--device cpu --latent 32]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from cuda_timing import time_cpu_ms, time_ms
from safetensors.torch import save_file

from gpu_denoisers import SD15_UNET, SDXL_UNET


def share_weights(ref: torch.nn.Module, cls: Any, params: Any, *, device: str) -> torch.nn.Module:
    """Our model holding ``ref``'s own weight tensors (built on the meta device, then assigned)."""
    from diffblocks.components.models.buffers import materialize_computed_buffers

    with torch.device("meta"):
        ours = cls(params)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    materialize_computed_buffers(ours, device=torch.device(device))
    return ours.eval()


def adapter_tensors(unet: Any, kind: str, embed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random tensors of an IP-Adapter file in the original layout for a diffusers UNet."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    cross = unet.config.cross_attention_dim
    out: dict[str, torch.Tensor] = {}
    if kind == "plain":
        out |= {"image_proj.proj.weight": rand(4 * cross, embed), "image_proj.proj.bias": rand(4 * cross),
                "image_proj.norm.weight": 1 + rand(cross), "image_proj.norm.bias": rand(cross)}  # fmt: skip
    else:
        hidden, heads = (768, 12) if cross == 768 else (1280, 20)
        out |= {"image_proj.latents": rand(1, 16, hidden, std=1.0), "image_proj.proj_in.weight": rand(hidden, embed),
                "image_proj.proj_in.bias": rand(hidden), "image_proj.proj_out.weight": rand(cross, hidden),
                "image_proj.proj_out.bias": rand(cross), "image_proj.norm_out.weight": 1 + rand(cross),
                "image_proj.norm_out.bias": rand(cross)}  # fmt: skip
        for i in range(4):
            p, inner = f"image_proj.layers.{i}", heads * 64
            out |= {f"{p}.0.norm1.weight": 1 + rand(hidden), f"{p}.0.norm1.bias": rand(hidden),
                    f"{p}.0.norm2.weight": 1 + rand(hidden), f"{p}.0.norm2.bias": rand(hidden),
                    f"{p}.0.to_q.weight": rand(inner, hidden), f"{p}.0.to_kv.weight": rand(2 * inner, hidden),
                    f"{p}.0.to_out.weight": rand(hidden, inner), f"{p}.1.0.weight": 1 + rand(hidden),
                    f"{p}.1.0.bias": rand(hidden), f"{p}.1.1.weight": rand(4 * hidden, hidden),
                    f"{p}.1.3.weight": rand(hidden, 4 * hidden)}  # fmt: skip
    layers = [unet.get_submodule(n.removesuffix(".processor")) for n in unet.attn_processors if n.endswith("attn2.processor")]
    for i, layer in enumerate(layers):
        out[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = rand(layer.to_k.out_features, cross)
        out[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = rand(layer.to_k.out_features, cross)
    return out


def row(name: str, kind: str, repeat: int, device: str, latent: int | None) -> None:
    import diffusers

    from diffblocks.components.denoisers import Conditioning, UNetDenoiser
    from diffblocks.components.models.ip_adapter import load_ip_adapter_file
    from diffblocks.components.models.unet import UNet2DConditionModel

    dtype, sdxl = (torch.float16 if device == "cuda" else torch.float32), name == "sdxl"
    config = SDXL_UNET if sdxl else SD15_UNET
    with torch.device(device):
        ref = diffusers.UNet2DConditionModel(**config).to(dtype).eval()
    params = UNet2DConditionModel.Params.model_validate({k: v for k, v in ref.config.items() if k in UNet2DConditionModel.Params.model_fields})
    ours = share_weights(ref, UNet2DConditionModel, params, device=device)
    embed = (1280 if sdxl else 1024) if kind == "plain" else 1280
    tensors = adapter_tensors(ref, kind, embed, dtype)
    path = Path(tempfile.mkdtemp()) / "ip.safetensors"
    save_file(tensors, path)
    adapter = load_ip_adapter_file(path).to(device)
    nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in tensors.items():
        part, rest = key.split(".", 1)
        nested[part][rest] = value.to(device)
    with torch.device("meta"):
        with_ip = diffusers.UNet2DConditionModel(**config).eval()
    with_ip.load_state_dict(ref.state_dict(), assign=True)  # the same tensors: one copy of the weights in memory
    with_ip._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)

    g = torch.Generator(device).manual_seed(1)
    size, seq, ctx = (128, 77, 2048) if sdxl else (64, 77, 768)
    size = latent or size
    x = torch.randn(2, 4, size, size, device=device, generator=g, dtype=dtype)
    t = torch.tensor(500.0, device=device)
    text = torch.randn(2, seq, ctx, device=device, generator=g, dtype=dtype)
    added = {"text_embeds": torch.randn(2, 1280, device=device, dtype=dtype), "time_ids": torch.ones(2, 6, device=device, dtype=dtype)} if sdxl else None
    features = torch.randn(2, 1, embed, device=device, generator=g, dtype=dtype) if kind == "plain" else torch.randn(2, 1, 257, embed, device=device, generator=g, dtype=dtype)
    with torch.inference_mode():
        tokens = adapter.project(features)
        cond = Conditioning(text, pooled_embeds=None if added is None else added["text_embeds"], time_ids=None if added is None else added["time_ids"])
        plain_ours, ip_ours = UNetDenoiser(ours), UNetDenoiser(ours, ip_adapter=adapter)
        ip_cond = Conditioning(cond.prompt_embeds, pooled_embeds=cond.pooled_embeds, time_ids=cond.time_ids, image_embeds=(tokens,))
        theirs_kwargs = {**(added or {}), "image_embeds": [features]}
        runs = {
            "ours, no IP": lambda: plain_ours(x, t, cond),
            f"ours, {kind}": lambda: ip_ours(x, t, ip_cond),
            "diffusers, no IP": lambda: ref(x, t, text, added_cond_kwargs=added).sample,
            f"diffusers, {kind}": lambda: with_ip(x, t, text, added_cond_kwargs=theirs_kwargs).sample,
        }
        a, b = runs[f"ours, {kind}"](), runs[f"diffusers, {kind}"]()
        timer = time_ms if device == "cuda" else time_cpu_ms
        times = {label: timer(fn, repeat=repeat) for label, fn in runs.items()}
    print(f"{name} {kind} ({size}x{size} latents, {dtype}): max |ours - diffusers| = {(a - b).abs().max().item():.2e} (outputs {a.abs().max().item():.2f})")
    for label, ms in times.items():
        print(f"  {label:22s} {ms:8.2f} ms")
    del ref, ours, with_ip
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="sd15,sdxl")
    parser.add_argument("--kinds", default="plain,plus")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--latent", type=int, default=None, help="latent size (default: 64 for SD1.5, 128 for SDXL)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    print(torch.cuda.get_device_name() if args.device == "cuda" else "cpu", torch.__version__)
    for name in args.rows.split(","):
        for kind in args.kinds.split(","):
            row(name, kind, args.repeat, args.device, args.latent)


if __name__ == "__main__":
    main()
