"""Per-step cost of IP-Adapter FaceID's LoRA: one UNet forward without IP-Adapter, with FaceID's tokens only, with its LoRA, fused.

SD1.5's UNet at its real config with random weights takes a classifier-free guidance batch of 2
(512² in fp16 on a GPU; ``--device cpu`` runs float32 at ``--latent`` size, one thread, timed with
perf_counter medians). A random FaceID adapter of the released shapes (4 tokens from a 512-wide
face embedding, a rank-128 LoRA of the query, key, value and output projections of all 32
attention layers) acts on it: its tokens alone (the LoRA not attached), its LoRA attached as
``load_ip_adapter`` attaches it (beside each layer), and fused into the weights (``fuse_lora``).

Run: python bench/faceid.py [--repeat 20] [--device cpu --latent 16] [--rank 128]
"""

from __future__ import annotations

import argparse

import torch
from cuda_timing import time_cpu_ms, time_ms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--rank", type=int, default=128)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    print(torch.cuda.get_device_name() if args.device == "cuda" else "cpu", torch.__version__)

    from diffblocks.components.denoisers import Conditioning, UNetDenoiser
    from diffblocks.components.lora import LoRA, LoRAWeights, fuse, inject, unfuse
    from diffblocks.components.models.ip_adapter import FaceIDProjection, IPAdapterModel, attention_dims, cross_attention_layers
    from diffblocks.components.models.unet import UNet2DConditionModel

    device, dtype = torch.device(args.device), (torch.float16 if args.device == "cuda" else torch.float32)
    torch.manual_seed(0)
    with device:
        unet = UNet2DConditionModel.from_config({"cross_attention_dim": 768, "sample_size": 64}).to(dtype).eval()
        layers = [attn.key_dims for _, attn in cross_attention_layers(unet)]
        adapter = IPAdapterModel(FaceIDProjection(512, 768), layers, lora_dims=attention_dims(unet), lora_rank=args.rank).to(dtype).eval()
    updates = adapter.lora_updates(unet)
    lora = LoRA("faceid_0", {path: LoRAWeights(down, up, alpha=float(args.rank)) for path, (down, up) in updates.items()})

    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(2, 4, args.latent, args.latent, device=device, generator=g, dtype=dtype)
    t = torch.tensor(500.0, device=device)
    text = torch.randn(2, 77, 768, device=device, generator=g, dtype=dtype)
    with torch.inference_mode():
        tokens = adapter.project(torch.nn.functional.normalize(torch.randn(2, 1, 512, device=device, generator=g), dim=-1).to(dtype))
        plain, faceid = UNetDenoiser(unet), UNetDenoiser(unet, ip_adapter=adapter)
        cond, ip_cond = Conditioning(text), Conditioning(text, image_embeds=(tokens,))
        timer = time_ms if args.device == "cuda" else time_cpu_ms
        times = {"no IP-Adapter": timer(lambda: plain(x, t, cond), repeat=args.repeat)}
        times["FaceID tokens, no LoRA"] = timer(lambda: faceid(x, t, ip_cond), repeat=args.repeat)
        inject(unet, lora)
        unfused = faceid(x, t, ip_cond)
        times[f"FaceID + LoRA (rank {args.rank})"] = timer(lambda: faceid(x, t, ip_cond), repeat=args.repeat)
        fuse(unet)
        fused = faceid(x, t, ip_cond)
        times["FaceID + LoRA fused"] = timer(lambda: faceid(x, t, ip_cond), repeat=args.repeat)
        unfuse(unet)
    print(f"SD1.5 UNet, {args.latent}x{args.latent} latents, batch 2, {dtype}: max |fused - unfused| = {(fused - unfused).abs().max().item():.2e}")
    for label, ms in times.items():
        print(f"  {label:28s} {ms:9.2f} ms")


if __name__ == "__main__":
    main()
