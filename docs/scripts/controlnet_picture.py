"""Make docs/images/controlnet_canny.png: Canny edges of a picture beside what the tiny model draws from them.

No real ControlNet runs on a CPU in the docs' time, and the built-in tiny model has none, so this
script trains one, the paper's way (Zhang et al. 2023, section 3.2): a ControlNet whose encoder
starts as a copy of the tiny UNet's and whose zero convolutions start at zero, trained on pictures
of the tiny model's procedural world with their Canny edges (:func:`canny`) as control images,
while the UNet stays frozen. The loss is the UNet's own (rectified flow: the velocity
``noise - x_0``). Then each row of the picture is: a held-out world picture, its edges, and the
tiny pipeline's image for the picture's caption with that control image (``with_controlnet``), and
without it, from the same seed.

    python docs/scripts/controlnet_picture.py                # about 10 minutes on a CPU: 1500 steps of 8 pictures
    python docs/scripts/controlnet_picture.py --steps 1 --samples 8 --rows 1 --inference-steps 2 --out smoke.png  # a smoke run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from diffblocks.blocks import Pipeline
from diffblocks.blocks.standard.canny import canny
from diffblocks.components.models.controlnet import ControlNetModel
from diffblocks.presets.controlnet import with_controlnet
from diffblocks.presets.tiny.preset import builtin_model_dir
from diffblocks.presets.tiny.text_encoder import encode_prompts
from diffblocks.presets.tiny.train.denoiser import flow_interpolate, sample_sigmas
from diffblocks.presets.tiny.world import make_batch

OUT = Path(__file__).resolve().parents[1] / "images" / "controlnet_canny.png"
EDGES = dict(low=60, high=120)  # the world's flat colours: edges of every shape, nothing inside them


def controlnet_from_unet(unet: torch.nn.Module) -> ControlNetModel:
    """A ControlNet for ``unet``: its encoder and mid block copied, the hint encoder new, the zero convolutions at zero."""
    p = unet.params
    net = ControlNetModel.from_config({
        "in_channels": p.in_channels, "block_out_channels": p.block_out_channels, "layers_per_block": p.layers_per_block,
        "down_block_types": p.down_block_types, "cross_attention_dim": p.cross_attention_dim,
        "attention_head_dim": p.attention_head_dim, "transformer_layers_per_block": p.transformer_layers_per_block,
        "use_linear_projection": p.use_linear_projection, "norm_num_groups": p.norm_num_groups,
        "conditioning_embedding_out_channels": (16, 32, 64),  # two stride-2 steps: the tiny VAE's factor 4
    })  # fmt: skip
    copied = {k: v for k, v in unet.state_dict().items() if k.split(".")[0] in {"conv_in", "time_embedding", "down_blocks", "mid_block"}}
    missing = net.load_state_dict(copied, strict=False).missing_keys
    assert all(k.startswith(("controlnet_", "time_proj")) for k in missing), missing
    return net


def edges_of(images: np.ndarray) -> torch.Tensor:
    """The control images of uint8 pictures (n, h, w, 3): their Canny edges in [0, 1], (n, 3, h, w)."""
    edges = np.stack([np.asarray(canny(PIL.Image.fromarray(image), **EDGES)) for image in images])
    return torch.from_numpy(edges).permute(0, 3, 1, 2).float() / 255


def train(pipe: Pipeline, *, steps: int, samples: int, batch: int, lr: float, seed: int, log: bool) -> ControlNetModel:
    unet, vae = pipe.components["unet"], pipe.components["vae"]
    encoder, tokenizer = pipe.components["text_encoder"], pipe.components["tokenizer"]
    unet.requires_grad_(False)
    net = controlnet_from_unet(unet).train()
    images, captions = make_batch(samples, seed)
    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = torch.cat([vae.normalize_latents(vae.encode(pixels[i : i + 256]).mode()) for i in range(0, samples, 256)])
        text = [encode_prompts(captions[i : i + 256], tokenizer=tokenizer, model=encoder) for i in range(0, samples, 256)]
        tokens, mask = torch.cat([t.tokens for t in text]), torch.cat([t.mask for t in text])
    control = edges_of(images)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    generator, started = torch.Generator().manual_seed(seed), time.monotonic()
    for step in range(steps):
        index = torch.randint(samples, (batch,), generator=generator)
        x0, noise = latents[index], torch.randn(latents[index].shape, generator=generator)
        sigma = sample_sigmas(batch, generator=generator, device=x0.device)
        x_t, t = flow_interpolate(x0, noise, sigma), sigma * 1000
        residuals = net(x_t, t, tokens[index], control[index], encoder_attention_mask=mask[index])
        prediction = unet(x_t, t, tokens[index], encoder_attention_mask=mask[index],
                          down_block_additional_residuals=residuals[:-1], mid_block_additional_residual=residuals[-1])  # fmt: skip
        loss = F.mse_loss(prediction, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log and (step % 20 == 0 or step == steps - 1):
            print(f"step {step} loss {loss.item():.4f} {time.monotonic() - started:.0f}s", flush=True)
    return net.eval()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rows", type=int, default=3)
    parser.add_argument("--inference-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    pipe = Pipeline.from_pretrained(builtin_model_dir())
    net = train(pipe, steps=args.steps, samples=args.samples, batch=args.batch, lr=args.lr, seed=args.seed, log=args.steps > 2)
    controlled = with_controlnet(pipe, net)
    images, captions = make_batch(args.rows, args.seed + 1)  # another seed: pictures the net was not trained on
    rows = []
    for image, caption in zip(images, captions, strict=True):
        edges = canny(PIL.Image.fromarray(image), **EDGES)
        kwargs = dict(prompt=caption, num_inference_steps=args.inference_steps, output_type="np", progress=False)
        with_control = controlled(**kwargs, control_image=edges, generator=torch.Generator().manual_seed(0)).images[0]
        without = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images[0]
        cells = [image, np.asarray(edges), *(np.round(x * 255).astype("uint8") for x in (with_control, without))]
        rows.append(np.concatenate([np.pad(c, ((2, 2), (2, 2), (0, 0)), constant_values=255) for c in cells], axis=1))
        print(f"{caption!r}")
    picture = PIL.Image.fromarray(np.concatenate(rows, axis=0)).resize((68 * 4 * 2, 68 * len(rows) * 2), PIL.Image.NEAREST)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.out)
    return args.out


if __name__ == "__main__":
    print(main())
